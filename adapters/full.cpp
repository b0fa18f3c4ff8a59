#include "adapters/full.h"

namespace lorafit {

AdapterSpec full_strategy() {
  AdapterSpec spec;
  spec.name = "full";
  spec.summary = "every weight of the model trains in fp32 (full fine-tuning); writes a model";
  spec.attach_new = [](const AdapterSettings&, const AdapterSites&) {};
  spec.save = [](const AdapterSettings&, const AdapterSites&, const std::string&) {
    return SavedAdapter{};
  };
  spec.trains_base = true;
  spec.in_jobs = false;
  spec.with_trainable_base = false;
  return spec;
}

}  // namespace lorafit
