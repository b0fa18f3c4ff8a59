#include "adapters/job_routing.h"

#include <set>

namespace lorafit {

int64_t JobRows::total() const {
  int64_t n = 0;
  for (const auto& s : spans) n += s.rows;
  return n;
}

namespace {

// x's rows of `span` when x holds `total` batch rows, as [rows, ...] or [rows * T, ...].
torch::Tensor span_rows(const torch::Tensor& x, int64_t total, int64_t first, int64_t rows) {
  const int64_t per = x.size(0) / total;
  return x.narrow(0, first * per, rows * per);
}

}  // namespace

JobRouterImpl::JobRouterImpl(std::vector<Projection> jobs_, std::shared_ptr<const JobRows> rows_)
    : jobs(std::move(jobs_)), rows(std::move(rows_)) {}

std::optional<LowRank> JobRouterImpl::low_rank() const {
  if (rows->spans.size() == 1) {
    const auto& p = jobs[rows->spans[0].job];
    return p->adapter ? p->adapter->low_rank() : LowRank{};
  }
  LowRank out{{}, 0.0, rows->total()};
  int64_t row = 0;
  for (const auto& span : rows->spans) {
    const auto& adapter = jobs[span.job]->adapter;
    if (adapter) {
      auto f = adapter->low_rank();
      if (!f || (f->dropout > 0 && adapter->is_training())) return std::nullopt;
      for (auto t : f->terms) {
        t.row_begin = row, t.row_end = row + span.rows;
        out.terms.push_back(std::move(t));
      }
    }
    row += span.rows;
  }
  return out;
}

torch::Tensor JobRouterImpl::forward(const torch::Tensor& x, const torch::Tensor& base) {
  if (rows->spans.size() == 1) {
    const auto& adapter = jobs[rows->spans[0].job]->adapter;
    return adapter ? adapted_output(*adapter, x, base) : base;
  }
  const auto total = rows->total();
  std::vector<torch::Tensor> outs;  // [rows of a span, ..., out]
  int64_t row = 0;
  for (const auto& span : rows->spans) {
    const auto xs = span_rows(x, total, row, span.rows);
    const auto bs = span_rows(base, total, row, span.rows);
    const auto& adapter = jobs[span.job]->adapter;
    outs.push_back(adapter ? adapted_output(*adapter, xs, bs) : bs);
    row += span.rows;
  }
  return torch::cat(outs, 0);
}

void JobRouterImpl::train(bool on) {
  torch::nn::Module::train(on);
  for (auto& p : jobs) p->train(on);
}

JobFfnRouterImpl::JobFfnRouterImpl(size_t n,
                                   std::shared_ptr<JobRows> rows_,
                                   std::function<torch::Tensor(const torch::Tensor&)> plain_)
    : jobs(n), rows(std::move(rows_)), plain(std::move(plain_)) {}

torch::Tensor JobFfnRouterImpl::forward(const torch::Tensor& x,
                                        const torch::Tensor& gate_up,
                                        const torch::Tensor& down) {
  const JobRows all = *rows;
  // Runs of consecutive spans without a block adapter go through the plain block together,
  // the projection routers seeing only those rows meanwhile.
  struct Restore {
    JobRows& rows;
    const JobRows& saved;
    ~Restore() { rows = saved; }
  } restore{*rows, all};
  const auto total = all.total();
  const bool whole = all.spans.size() == 1;
  std::vector<torch::Tensor> outs;  // [rows of a run, C]
  size_t i = 0;
  int64_t row = 0;
  while (i < all.spans.size()) {
    const auto& adapter = jobs[all.spans[i].job];
    if (adapter) {
      const auto rows_i = all.spans[i].rows;
      outs.push_back(adapter->forward(whole ? x : span_rows(x, total, row, rows_i), gate_up, down));
      row += rows_i, ++i;
      continue;
    }
    JobRows run;
    for (; i < all.spans.size() && !jobs[all.spans[i].job]; ++i) run.spans.push_back(all.spans[i]);
    const auto run_rows = run.total();
    *rows = run;
    outs.push_back(plain(whole ? x : span_rows(x, total, row, run_rows)));
    *rows = all;
    row += run_rows;
  }
  return outs.size() == 1 ? outs[0] : torch::cat(outs, 0);
}

torch::Tensor JobFfnRouterImpl::take_backward_root() {
  torch::Tensor sum;
  for (auto& a : jobs) {
    if (!a) continue;
    const auto root = a->take_backward_root();
    if (root.defined()) sum = sum.defined() ? sum + root : root;
  }
  return sum;
}

void JobFfnRouterImpl::train(bool on) {
  torch::nn::Module::train(on);
  for (auto& a : jobs)
    if (a) a->train(on);
}

JobRouting route_jobs(const AdapterSites& model, size_t n) {
  JobRouting r;
  r.model = model;
  if (n == 1) {
    r.sites = {model};
    return r;
  }
  r.rows = std::make_shared<JobRows>(JobRows::only(0));
  r.sites.resize(n);
  for (const auto& p : model.projections) {
    std::vector<Projection> views;
    for (size_t j = 0; j < n; ++j) {
      views.emplace_back(p->name, p->in_features, p->out_features, p->options, p->weight,
                         torch::Tensor(), p->quantized());
      views.back()->nf4 = p->nf4;
      r.sites[j].projections.push_back(views.back());
    }
    r.projection_routers.emplace_back(std::move(views), r.rows);
  }
  for (const auto& site : model.ffns) {
    JobFfnRouter router(n, r.rows, site.plain);
    for (size_t j = 0; j < n; ++j) {
      auto job_site = site;
      job_site.attach = [router, j](std::shared_ptr<FfnAdapterImpl> a) mutable {
        router->jobs[j] = std::move(a);
      };
      job_site.adapter = [router, j] { return router->jobs[j]; };
      r.sites[j].ffns.push_back(job_site);
    }
    r.ffn_routers.push_back(router);
  }
  return r;
}

void JobRouting::place_routers() {
  if (!rows) return;
  for (size_t i = 0; i < projection_routers.size(); ++i) {
    auto& router = projection_routers[i];
    bool used = false;
    for (const auto& p : router->jobs) used = used || p->adapter != nullptr;
    if (used) model.projections[i]->attach(router.ptr());
  }
  for (size_t i = 0; i < ffn_routers.size(); ++i) {
    bool used = false;
    for (const auto& a : ffn_routers[i]->jobs) used = used || a != nullptr;
    if (used) model.ffns[i].attach(ffn_routers[i].ptr());
  }
}

void JobRouting::set_rows(std::vector<JobRows::Span> spans) {
  if (rows) rows->spans = std::move(spans);
}

std::vector<torch::Tensor> adapter_parameters(const AdapterSites& sites) {
  std::vector<torch::Tensor> out;
  std::set<const void*> seen;
  auto add = [&](const torch::nn::Module& m) {
    for (const auto& t : m.parameters(/*recurse=*/true))
      if (seen.insert(t.unsafeGetTensorImpl()).second) out.push_back(t);
  };
  for (const auto& p : sites.projections)
    if (p->adapter) add(*p->adapter);
  for (const auto& site : sites.ffns)
    if (const auto a = site.adapter()) add(*a);
  return out;
}

}  // namespace lorafit
