#include "core/loss_plot.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace lorafit {

namespace {

constexpr double kWidth = 640, kHeight = 400, kLeft = 60, kRight = 20, kTop = 30, kBottom = 45;

std::string fmt(double v) {
  std::ostringstream s;
  s.precision(6);
  s << (std::abs(v) < 1e-12 ? 0.0 : v);
  return s.str();
}

// A round tick spacing (1, 2 or 5 times a power of ten) that cuts `span` into about 5 parts.
double tick_step(double span) {
  const double raw = span / 5;
  const double unit = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0})
    if (m * unit >= raw) return m * unit;
  return 10 * unit;
}

}  // namespace

LossHistory read_loss_history(const std::string& metrics_path) {
  LossHistory h;
  std::ifstream in(metrics_path);
  std::string line;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object() || !j.contains("step")) continue;
    if (j.contains("loss")) h.train.emplace_back(j["step"], j["loss"]);
    if (j.contains("eval_loss")) h.valid.emplace_back(j["step"], j["eval_loss"]);
  }
  return h;
}

std::string loss_svg(const LossHistory& h) {
  double x_max = 1, y_min = INFINITY, y_max = -INFINITY;
  for (const auto* series : {&h.train, &h.valid}) {
    for (const auto& [step, loss] : *series) {
      x_max = std::max(x_max, static_cast<double>(step));
      y_min = std::min(y_min, loss);
      y_max = std::max(y_max, loss);
    }
  }
  if (!std::isfinite(y_min)) y_min = 0, y_max = 1;
  if (y_max - y_min < 1e-9) y_min -= 0.5, y_max += 0.5;
  // Both axes run between round ticks: steps from 0, losses from a tick below the lowest.
  const double x_step = std::max(1.0, std::ceil(tick_step(x_max)));
  x_max = std::ceil(x_max / x_step) * x_step;
  const double y_step = tick_step(y_max - y_min);
  y_min = std::floor(y_min / y_step) * y_step;
  y_max = std::ceil(y_max / y_step) * y_step;
  const double pw = kWidth - kLeft - kRight, ph = kHeight - kTop - kBottom;
  auto px = [&](double step) { return kLeft + step / x_max * pw; };
  auto py = [&](double loss) { return kTop + (y_max - loss) / (y_max - y_min) * ph; };

  std::ostringstream svg;
  svg << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << kWidth << "\" height=\"" << kHeight
      << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
      << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      << "<text x=\"" << kLeft << "\" y=\"18\" font-size=\"14\">loss</text>\n";
  const auto y_ticks = std::lround((y_max - y_min) / y_step);
  for (long i = 0; i <= y_ticks; ++i) {  // grid lines at round losses
    const double v = y_min + static_cast<double>(i) * y_step;
    svg << "<line x1=\"" << kLeft << "\" x2=\"" << kLeft + pw << "\" y1=\"" << py(v) << "\" y2=\""
        << py(v) << "\" stroke=\"#ddd\"/><text x=\"" << kLeft - 6 << "\" y=\"" << py(v) + 4
        << "\" text-anchor=\"end\">" << fmt(v) << "</text>\n";
  }
  const auto x_ticks = std::lround(x_max / x_step);
  for (long i = 0; i <= x_ticks; ++i) {  // round step ticks
    const double step = static_cast<double>(i) * x_step;
    svg << "<text x=\"" << px(step) << "\" y=\"" << kTop + ph + 16 << "\" text-anchor=\"middle\">"
        << fmt(step) << "</text>\n";
  }
  svg << "<text x=\"" << kLeft + pw / 2 << "\" y=\"" << kHeight - 8
      << "\" text-anchor=\"middle\">step</text>\n";
  const std::pair<const std::vector<std::pair<int64_t, double>>*, const char*> series[] = {
      {&h.train, "#1f77b4"}, {&h.valid, "#d62728"}};
  for (const auto& [points, color] : series) {
    if (points->empty()) continue;
    svg << "<polyline fill=\"none\" stroke=\"" << color << "\" stroke-width=\"2\" points=\"";
    for (const auto& [step, loss] : *points) svg << px(step) << "," << py(loss) << " ";
    svg << "\"/>\n";
  }
  svg << "<text x=\"" << kLeft + pw - 150 << "\" y=\"18\" fill=\"#1f77b4\">train</text>"
      << "<text x=\"" << kLeft + pw - 90
      << "\" y=\"18\" fill=\"#d62728\">validation</text>\n</svg>\n";
  return svg.str();
}

}  // namespace lorafit
