// Schemas of the chatterbox_rt operators (vLLM csrc/torch_bindings.cpp style) and their Meta
// kernels. Backend kernels register themselves next to their code: cpu/*.cpp (CPU) and
// cuda/*.cu (CUDA, only when built with CUDA). Importing `chatterbox_rt._C` runs these
// registrations; the module itself exposes nothing.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

namespace chatterbox_rt {
namespace {

// Meta (fake-tensor) kernels: the ops return nothing and only write their out-params, so tracing
// needs just the checks.
void snake_meta(at::Tensor& out, const at::Tensor& x, const at::Tensor& alpha, double) { check_snake(out, x, alpha); }

void istft_meta(at::Tensor& out, const at::Tensor& spec, const at::Tensor& window, int64_t n_fft, int64_t hop, double,
                const std::optional<at::Tensor>& n_frames) {
  check_istft(out, spec, window, n_fft, hop, n_frames);
}

void cfg_euler_meta(at::Tensor& out, const at::Tensor& x, const at::Tensor& v, const at::Tensor& dt, double) {
  check_cfg_euler(out, x, v, dt);
}

void cfg_euler_refresh_meta(at::Tensor& x, at::Tensor& x_in, const at::Tensor& v, const at::Tensor& dt, double) {
  check_cfg_euler_refresh(x, x_in, v, dt);
}

void euler_meta(at::Tensor& out, const at::Tensor& x, const at::Tensor& v, const at::Tensor& dt) {
  check_euler(out, x, v, dt);
}

void int8_linear_meta(at::Tensor& out, const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  check_int8_linear(out, x, q, scale);
}

void ngram_counts_meta(at::Tensor& sizes, at::Tensor& n_sizes, at::Tensor& ones, const at::Tensor& tokens,
                       const at::Tensor& lengths, int64_t vocab_size) {
  check_ngram_counts(sizes, n_sizes, ones, tokens, lengths, vocab_size);
}

void token_stats_meta(at::Tensor& code_counts, at::Tensor& run_hist, const at::Tensor& tokens,
                      const at::Tensor& lengths) {
  check_token_stats(code_counts, run_hist, tokens, lengths);
}

}  // namespace
}  // namespace chatterbox_rt

TORCH_LIBRARY(chatterbox_rt, m) {
  // out = x + sin(alpha x)^2 / (alpha + eps), x [B, C, T], alpha [C]; fp32 math (HiFT's Snake)
  m.def("snake(Tensor(a!) out, Tensor x, Tensor alpha, float eps) -> ()");
  // out [B, hop (F-1)] = clamp(istft(clip(exp(spec[:, :n/2+1]), 1e2) * e^{i sin(spec[:, n/2+1:])}), +-audio_limit);
  // n_frames [B]: frames past n_frames[b] are left out of both the overlap-add and its window envelope
  m.def(
      "istft(Tensor(a!) out, Tensor spec, Tensor window, int n_fft, int hop, float audio_limit, "
      "Tensor? n_frames=None) -> ()");
  // out = x + dt ((1 + w) v[:B] - w v[B:]), dt a 1-element tensor (no host sync)
  m.def("cfg_euler(Tensor(a!) out, Tensor x, Tensor v, Tensor dt, float cfg_rate) -> ()");
  // x += dt ((1 + w) v[:B] - w v[B:]); x_in[:B] = x_in[B:] = x (the next step's estimator input)
  m.def("cfg_euler_refresh(Tensor(a!) x, Tensor(b!) x_in, Tensor v, Tensor dt, float cfg_rate) -> ()");
  // out = x + dt v (meanflow, no CFG)
  m.def("euler(Tensor(a!) out, Tensor x, Tensor v, Tensor dt) -> ()");
  // out [M, N] = (x [M, K] @ q [N, K]^T) * scale [N]: weight-only INT8 (T3 with int8 weights), fp32 x/out
  m.def("int8_linear(Tensor(a!) out, Tensor x, Tensor q, Tensor scale) -> ()");
  // Exact n-gram counts, n = 1..max_n (= sizes.size(0)), of tokens [N] cut into rows of lengths [R]:
  // sizes[n-1, :n_sizes[n-1]] = sizes of the n-gram groups of >= 2 (lexicographic order), ones[n-1] =
  // n-grams seen once (CPU only; chatterbox_rt.tokens.analyze)
  m.def(
      "ngram_counts(Tensor(a!) sizes, Tensor(b!) n_sizes, Tensor(c!) ones, Tensor tokens, Tensor lengths, "
      "int vocab_size) -> ()");
  // code_counts [V] = occurrences of each token, run_hist [L] = runs of L equal tokens within a row
  // (L >= 1; run_hist must be longer than the longest row), of the same stream (CPU only)
  m.def("token_stats(Tensor(a!) code_counts, Tensor(b!) run_hist, Tensor tokens, Tensor lengths) -> ()");
}

TORCH_LIBRARY_IMPL(chatterbox_rt, Meta, m) {
  m.impl("snake", &chatterbox_rt::snake_meta);
  m.impl("istft", &chatterbox_rt::istft_meta);
  m.impl("cfg_euler", &chatterbox_rt::cfg_euler_meta);
  m.impl("cfg_euler_refresh", &chatterbox_rt::cfg_euler_refresh_meta);
  m.impl("euler", &chatterbox_rt::euler_meta);
  m.impl("int8_linear", &chatterbox_rt::int8_linear_meta);
  m.impl("ngram_counts", &chatterbox_rt::ngram_counts_meta);
  m.impl("token_stats", &chatterbox_rt::token_stats_meta);
}

// `import chatterbox_rt._C` needs a module init; loading the library is what registers the ops.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "chatterbox_rt native operators", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
