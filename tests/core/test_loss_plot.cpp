#include <catch2/catch.hpp>
#include <regex>

#include "core/loss_plot.h"

using namespace lorafit;

namespace {

// The numbers an SVG writes as axis labels, in order.
std::vector<double> labels(const std::string& svg) {
  std::vector<double> out;
  const std::regex label("text-anchor=\"(end|middle)\">([-0-9.e]+)</text>");
  for (auto it = std::sregex_iterator(svg.begin(), svg.end(), label); it != std::sregex_iterator();
       ++it)
    out.push_back(std::stod((*it)[2].str()));
  return out;
}

}  // namespace

TEST_CASE("the loss plot's axes have round ticks and start at step 0", "[core][loss_plot]") {
  LossHistory h;
  for (int64_t s = 1; s <= 137; ++s) h.train.emplace_back(s, 6.07 - 3.76 * s / 137.0);
  h.valid = {{0, 6.3}, {50, 4.1}, {100, 3.0}, {137, 2.9}};
  const auto values = labels(loss_svg(h));
  // Losses 2.31..6.3 on ticks of 1 from 2 to 7; steps 0..137 on ticks of 50 up to 150.
  REQUIRE(values == std::vector<double>{2, 3, 4, 5, 6, 7, 0, 50, 100, 150});
  LossHistory fine;
  fine.train = {{1, 0.52}, {2, 0.47}, {3, 0.455}};
  const auto small = labels(loss_svg(fine));
  // 0.455..0.52: ticks of 0.02 from 0.44 to 0.52.
  REQUIRE(small.front() == Approx(0.44));
  REQUIRE(small[1] - small[0] == Approx(0.02));
  REQUIRE(small[4] == Approx(0.52));
}
