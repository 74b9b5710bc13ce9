// Per-token statistics of a token stream cut into rows (chatterbox_rt.tokens.analyze), in one pass:
//   code_counts[v] = occurrences of token v                      (np.bincount(tokens, minlength=V))
//   run_hist[L]    = runs of L equal tokens in a row, a row start always starting a new run
//                    (np.bincount of the run lengths analyze.py's numpy path computes).
// numpy needs a widening copy for bincount and five passes over 10 M positions for the runs
// (~0.2 s on the 2-core CI VM); here: one histogram pass (four interleaved sub-histograms, so a
// repeated token does not wait on its own counter's last store) and one pass for the runs.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../ops.h"

namespace chatterbox_rt {
namespace {

constexpr int kLanes = 4;  // sub-histograms: a token repeated at p, p + 1 hits different counters
constexpr int64_t kLanesMaxVocab = int64_t{1} << 16;  // larger vocabularies count in one histogram

template <class Tok>
void count(const Tok* tok, const int64_t* len, int64_t rows, int64_t N, int64_t V, int64_t* code_counts,
           int64_t* run_hist) {
  const int lanes = V <= kLanesMaxVocab ? kLanes : 1;
  std::vector<int64_t> sub(lanes == 1 ? 0 : kLanes * V, 0);
  int64_t* h = lanes == 1 ? code_counts : sub.data();
  int64_t i = 0;
  for (; lanes > 1 && i + kLanes <= N; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const int64_t t = static_cast<int64_t>(tok[i + l]);
      TORCH_CHECK(t >= 0 && t < V, "token_stats: tokens must lie in [0, vocab_size = ", V, "), found ", t,
                  " at position ", i + l);
      ++h[l * V + t];
    }
  }
  for (; i < N; ++i) {
    const int64_t t = static_cast<int64_t>(tok[i]);
    TORCH_CHECK(t >= 0 && t < V, "token_stats: tokens must lie in [0, vocab_size = ", V, "), found ", t,
                " at position ", i);
    ++h[t];
  }
  if (lanes > 1) {
    for (int64_t v = 0; v < V; ++v) {
      int64_t c = 0;
      for (int l = 0; l < kLanes; ++l) c += h[l * V + v];
      code_counts[v] = c;
    }
  }
  // Runs: the positions where the token changes, 64 at a time as a bit mask (the compares
  // vectorise), then one increment per run; a row start always starts a run.
  int64_t p = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t end = p + len[r];
    int64_t run_start = p, q = p + 1;
    for (; q + 64 <= end; q += 64) {
      uint64_t m = 0;
      for (int j = 0; j < 64; ++j) m |= static_cast<uint64_t>(tok[q + j] != tok[q + j - 1]) << j;
      for (; m; m &= m - 1) {
        const int64_t at = q + __builtin_ctzll(m);
        ++run_hist[at - run_start];
        run_start = at;
      }
    }
    for (; q < end; ++q) {
      if (tok[q] != tok[q - 1]) {
        ++run_hist[q - run_start];
        run_start = q;
      }
    }
    if (end > run_start) ++run_hist[end - run_start];
    p = end;
  }
}

}  // namespace

void token_stats_cpu(at::Tensor& code_counts, at::Tensor& run_hist, const at::Tensor& tokens,
                     const at::Tensor& lengths) {
  check_token_stats(code_counts, run_hist, tokens, lengths);
  TORCH_CHECK(tokens.device().is_cpu(), "token_stats: the CPU kernel got a tensor on ", tokens.device());
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  const int64_t rows = lengths.numel();
  int64_t total = 0, longest = 0;
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(len[r] >= 0, "token_stats: lengths must be >= 0, got ", len[r], " for row ", r);
    total += len[r];
    longest = std::max(longest, len[r]);
  }
  TORCH_CHECK(total == tokens.numel(), "token_stats: the row lengths add up to ", total, " but there are ",
              tokens.numel(), " tokens");
  TORCH_CHECK(run_hist.size(0) > longest, "token_stats: run_hist must have room for runs as long as the longest row (",
              longest, "), i.e. at least ", longest + 1, " entries, got ", run_hist.size(0));
  int64_t* cc = code_counts.data_ptr<int64_t>();
  int64_t* rh = run_hist.data_ptr<int64_t>();
  std::fill(cc, cc + code_counts.numel(), 0);
  std::fill(rh, rh + run_hist.numel(), 0);
  const int64_t V = code_counts.size(0);
  switch (tokens.scalar_type()) {
    case at::kByte: count(tokens.const_data_ptr<uint8_t>(), len, rows, tokens.numel(), V, cc, rh); break;
    case at::kShort: count(tokens.const_data_ptr<int16_t>(), len, rows, tokens.numel(), V, cc, rh); break;
    case at::kInt: count(tokens.const_data_ptr<int32_t>(), len, rows, tokens.numel(), V, cc, rh); break;
    case at::kLong: count(tokens.const_data_ptr<int64_t>(), len, rows, tokens.numel(), V, cc, rh); break;
    default: TORCH_CHECK(false, "token_stats: unsupported token dtype ", tokens.scalar_type());
  }
}

TORCH_LIBRARY_IMPL(chatterbox_rt, CPU, m) { m.impl("token_stats", &token_stats_cpu); }

}  // namespace chatterbox_rt
