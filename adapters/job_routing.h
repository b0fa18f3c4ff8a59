// Several adapters trained at once on one frozen base (ASPEN / m-LoRA): the rows of a fused
// batch belong to jobs, every row goes through one base GEMM per projection, and each job's
// rows through that job's adapters only. Each job attaches its adapters to sites of its own
// that view the model's weights, so a strategy never knows it shares the model; the model's
// projections and MLP blocks carry routers that send each job's rows to those adapters.
#pragma once

#include <memory>
#include <vector>

#include "adapters/strategy.h"
#include "core/projection.h"

namespace lorafit {

/// Which job owns which rows of the batch in flight, in row order. A single span owns every
/// row, whatever their number (evaluation of one job, a job alone in a step).
struct JobRows {
  struct Span {
    size_t job = 0;
    int64_t rows = 0;  // batch rows
  };
  std::vector<Span> spans;

  static JobRows only(size_t job) { return {{{job, 0}}}; }
  int64_t total() const;
};

/// On a model projection: each span's rows take the adapter that span's job put on its own
/// view of the projection (none: the base output).
struct JobRouterImpl : ProjectionAdapterImpl {
  JobRouterImpl(std::vector<Projection> jobs, std::shared_ptr<const JobRows> rows);
  /// Each job's terms on its own rows (LowRankTerm::row_begin, row_end);
  /// std::nullopt when an adapter is not low-rank or drops out (then forward runs each span).
  std::optional<LowRank> low_rank() const override;
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& base) override;
  /// The jobs' adapters are not submodules (their parameters belong to their jobs, not to
  /// the model): they follow the model into training or evaluation here.
  void train(bool on = true) override;

  std::vector<Projection> jobs;  // per job: a projection viewing this one's weight
  std::shared_ptr<const JobRows> rows;
};
TORCH_MODULE(JobRouter);

/// On a model MLP: each span's rows go through its job's block adapter (MixLoRA), or through
/// the block's own projections (and the projection routers) when the job has none.
struct JobFfnRouterImpl : FfnAdapterImpl {
  JobFfnRouterImpl(size_t jobs,
                   std::shared_ptr<JobRows> rows,
                   std::function<torch::Tensor(const torch::Tensor&)> plain);
  /// x: [N, C] -> [N, C]
  torch::Tensor forward(const torch::Tensor& x,
                        const torch::Tensor& gate_up,
                        const torch::Tensor& down) override;
  torch::Tensor take_backward_root() override;
  void train(bool on = true) override;

  std::vector<std::shared_ptr<FfnAdapterImpl>> jobs;  // per job, nullptr: none
  std::shared_ptr<JobRows> rows;
  std::function<torch::Tensor(const torch::Tensor&)> plain;  // FfnSite::plain
};
TORCH_MODULE(JobFfnRouter);

/// The sites of each job of a run. With one job they are the model's own and nothing routes;
/// with more, `rows` says before every forward pass which rows are whose.
struct JobRouting {
  std::vector<AdapterSites> sites;  // per job
  std::shared_ptr<JobRows> rows;    // nullptr with one job
  std::vector<JobRouter> projection_routers;
  std::vector<JobFfnRouter> ffn_routers;
  AdapterSites model;

  /// Puts each router on its model site where some job attached an adapter (again after
  /// jobs attach anew).
  void place_routers();
  /// Before a forward pass: `spans` in row order (ignored with one job).
  void set_rows(std::vector<JobRows::Span> spans);
};

JobRouting route_jobs(const AdapterSites& model, size_t jobs);

/// The parameters of the adapters attached at `sites`, each once, in site order.
std::vector<torch::Tensor> adapter_parameters(const AdapterSites& sites);

}  // namespace lorafit
