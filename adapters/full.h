// Full fine-tuning as a strategy: nothing is attached, every base weight trains in fp32, and
// the run writes a whole model instead of an adapter.
#pragma once

#include "adapters/strategy.h"

namespace lorafit {

AdapterSpec full_strategy();

}  // namespace lorafit
