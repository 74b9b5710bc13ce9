// chatterbox_rt native operators: declarations shared by bindings.cpp (schemas, Meta kernels),
// cpu/*.cpp and cuda/*.cu, plus the input checks every backend runs (so CPU, CUDA and Meta
// reject the same inputs with the same message).
//
// All ops write into caller-allocated outputs (out-params, `Tensor(a!)` in the schema) and
// return nothing: allocation stays in Python (kernels/_native.py), where buffers can be reused.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

// The ops take float32, float16 and bfloat16 (checked first, so other dtypes never get here).
#define CBRT_DISPATCH_FLOAT(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace chatterbox_rt {

// --- kernels (one per backend) ---------------------------------------------------------------
void snake_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& alpha, double eps);
void istft_cpu(at::Tensor& out, const at::Tensor& spec, const at::Tensor& window, int64_t n_fft, int64_t hop,
               double audio_limit, const std::optional<at::Tensor>& n_frames);
void cfg_euler_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& v, const at::Tensor& dt, double cfg_rate);
void cfg_euler_refresh_cpu(at::Tensor& x, at::Tensor& x_in, const at::Tensor& v, const at::Tensor& dt,
                           double cfg_rate);
void euler_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& v, const at::Tensor& dt);
void int8_linear_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale);
void ngram_counts_cpu(at::Tensor& sizes, at::Tensor& n_sizes, at::Tensor& ones, const at::Tensor& tokens,
                      const at::Tensor& lengths, int64_t vocab_size);
void token_stats_cpu(at::Tensor& code_counts, at::Tensor& run_hist, const at::Tensor& tokens, const at::Tensor& lengths);
// cuda/*.cu, compiled only into CUDA builds (setup.py)
void snake_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& alpha, double eps);
void istft_cuda(at::Tensor& out, const at::Tensor& spec, const at::Tensor& window, int64_t n_fft, int64_t hop,
                double audio_limit, const std::optional<at::Tensor>& n_frames);
void cfg_euler_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& v, const at::Tensor& dt, double cfg_rate);
void cfg_euler_refresh_cuda(at::Tensor& x, at::Tensor& x_in, const at::Tensor& v, const at::Tensor& dt,
                            double cfg_rate);
void euler_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& v, const at::Tensor& dt);

// --- input checks ----------------------------------------------------------------------------
inline bool is_float_type(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

inline void check_same_device(const char* op, const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but x/spec is on ", ref.device(),
              "; move all arguments to one device");
}

inline void check_float_contiguous(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_float_type(t), op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous() first)");
}

inline void check_out(const char* op, const at::Tensor& out, const at::Tensor& ref, at::IntArrayRef shape,
                      at::ScalarType dtype) {
  check_same_device(op, ref, out, "out");
  TORCH_CHECK(out.sizes() == shape, op, ": out has shape ", out.sizes(), ", expected ", shape);
  TORCH_CHECK(out.scalar_type() == dtype, op, ": out has dtype ", out.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
}

inline void check_snake(const at::Tensor& out, const at::Tensor& x, const at::Tensor& alpha) {
  check_float_contiguous("snake", x, "x");
  TORCH_CHECK(x.dim() == 3, "snake: x must be [B, C, T], got shape ", x.sizes());
  check_same_device("snake", x, alpha, "alpha");
  TORCH_CHECK(is_float_type(alpha), "snake: alpha must be a float tensor, got ", alpha.scalar_type());
  TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) == x.size(1), "snake: alpha must be [C] = [", x.size(1),
              "], got shape ", alpha.sizes());
  check_out("snake", out, x, x.sizes(), x.scalar_type());
}

inline void check_int8_linear(const at::Tensor& out, const at::Tensor& x, const at::Tensor& q,
                              const at::Tensor& scale) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "int8_linear: x must be a contiguous float32 [M, K] tensor, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(),
              "int8_linear: q must be a contiguous int8 [N, K] tensor, got ", q.scalar_type(), " ", q.sizes());
  TORCH_CHECK(q.size(1) == x.size(1), "int8_linear: x has K = ", x.size(1), " but q has K = ", q.size(1));
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == q.size(0) &&
                  scale.is_contiguous(),
              "int8_linear: scale must be a contiguous float32 [N] = [", q.size(0), "] tensor, got ",
              scale.scalar_type(), " ", scale.sizes());
  check_same_device("int8_linear", x, q, "q");
  check_same_device("int8_linear", x, scale, "scale");
  check_out("int8_linear", out, x, {x.size(0), q.size(0)}, at::kFloat);
}

// ngram_counts packs a token as its value + 1 in bit_length(vocab_size) bits (0 = before the row
// start) and carries the max_n - 1 tokens before each window in at most 95 bits; it keeps a few
// words per possible token (vocab_size < 2^20, as tokens/analyze.py's numpy path).
constexpr int kNgramCarryBits = 95;
constexpr int64_t kNgramMaxVocab = (int64_t{1} << 20) - 1;

inline int ngram_digit_bits(int64_t vocab_size) {
  int b = 0;
  while (b < 63 && (int64_t{1} << b) <= vocab_size) ++b;
  return b;
}

// A token stream: tokens [N] (uint8/int16/int32/int64) cut into rows of lengths [R] (int64).
inline void check_token_stream(const char* op, const at::Tensor& tokens, const at::Tensor& lengths) {
  const auto t = tokens.scalar_type();
  TORCH_CHECK(t == at::kByte || t == at::kShort || t == at::kInt || t == at::kLong, op,
              ": tokens must be uint8, int16, int32 or int64, got ", t);
  TORCH_CHECK(tokens.dim() == 1 && tokens.is_contiguous(), op, ": tokens must be a contiguous 1-D tensor, got shape ",
              tokens.sizes());
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && lengths.is_contiguous(), op,
              ": lengths must be a contiguous 1-D int64 tensor of row lengths, got ", lengths.scalar_type(), " ",
              lengths.sizes());
  TORCH_CHECK(lengths.device() == tokens.device(), op, ": lengths are on ", lengths.device(), " but tokens on ",
              tokens.device());
}

inline void check_int64_out(const char* op, const char* name, const at::Tensor& out, const at::Tensor& tokens) {
  TORCH_CHECK(out.scalar_type() == at::kLong && out.dim() == 1 && out.is_contiguous(), op, ": ", name,
              " must be a contiguous 1-D int64 tensor, got ", out.scalar_type(), " ", out.sizes());
  TORCH_CHECK(out.device() == tokens.device(), op, ": ", name, " is on ", out.device(), " but tokens on ",
              tokens.device());
}

inline void check_ngram_counts(const at::Tensor& sizes, const at::Tensor& n_sizes, const at::Tensor& ones,
                               const at::Tensor& tokens, const at::Tensor& lengths, int64_t vocab_size) {
  check_token_stream("ngram_counts", tokens, lengths);
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= kNgramMaxVocab, "ngram_counts: vocab_size must be in [1, ",
              kNgramMaxVocab, "], got ", vocab_size);
  TORCH_CHECK(sizes.scalar_type() == at::kInt && sizes.dim() == 2 && sizes.is_contiguous(),
              "ngram_counts: sizes must be a contiguous int32 [max_n, capacity] tensor, got ", sizes.scalar_type(), " ",
              sizes.sizes());
  TORCH_CHECK(sizes.device() == tokens.device(), "ngram_counts: sizes is on ", sizes.device(), " but tokens on ",
              tokens.device());
  const int64_t K = sizes.size(0);
  TORCH_CHECK(K >= 1, "ngram_counts: sizes must have max_n >= 1 rows, got ", K);
  const int b = ngram_digit_bits(vocab_size);
  TORCH_CHECK((K - 1) * b <= kNgramCarryBits, "ngram_counts: max_n = ", K, " with ", b,
              "-bit tokens (vocab_size ", vocab_size, ") needs ", (K - 1) * b, " bits of context per window, more than ",
              kNgramCarryBits, "; use the numpy path (chatterbox_rt.tokens.analyze) for these");
  check_int64_out("ngram_counts", "n_sizes", n_sizes, tokens);
  check_int64_out("ngram_counts", "ones", ones, tokens);
  TORCH_CHECK(n_sizes.size(0) == K && ones.size(0) == K, "ngram_counts: n_sizes and ones must be [max_n] = [", K,
              "], got ", n_sizes.sizes(), " and ", ones.sizes());
}

inline void check_token_stats(const at::Tensor& code_counts, const at::Tensor& run_hist, const at::Tensor& tokens,
                              const at::Tensor& lengths) {
  check_token_stream("token_stats", tokens, lengths);
  check_int64_out("token_stats", "code_counts", code_counts, tokens);
  check_int64_out("token_stats", "run_hist", run_hist, tokens);
  TORCH_CHECK(code_counts.size(0) >= 1, "token_stats: code_counts must be [vocab_size], vocab_size >= 1, got ",
              code_counts.sizes());
}

inline int64_t istft_out_len(int64_t hop, int64_t n_frames) { return n_frames > 0 ? hop * (n_frames - 1) : 0; }

inline void check_istft(const at::Tensor& out, const at::Tensor& spec, const at::Tensor& window, int64_t n_fft,
                        int64_t hop, const std::optional<at::Tensor>& n_frames) {
  TORCH_CHECK(n_fft >= 2 && n_fft % 2 == 0, "istft: n_fft must be even and >= 2, got ", n_fft);
  TORCH_CHECK(hop >= 1, "istft: hop must be >= 1, got ", hop);
  check_float_contiguous("istft", spec, "spec");
  TORCH_CHECK(spec.dim() == 3 && spec.size(1) == n_fft + 2, "istft: spec must be [B, n_fft + 2, F] = [B, ", n_fft + 2,
              ", F] (log-magnitude rows then phase rows, HiFT's conv_post output), got shape ", spec.sizes());
  check_same_device("istft", spec, window, "window");
  TORCH_CHECK(is_float_type(window), "istft: window must be a float tensor, got ", window.scalar_type());
  TORCH_CHECK(window.dim() == 1 && window.size(0) == n_fft, "istft: window must be [n_fft] = [", n_fft,
              "], got shape ", window.sizes());
  if (n_frames.has_value()) {
    const auto& nf = *n_frames;
    check_same_device("istft", spec, nf, "n_frames");
    TORCH_CHECK(nf.scalar_type() == at::kLong || nf.scalar_type() == at::kInt,
                "istft: n_frames must be an int64/int32 tensor of valid frames per row, got ", nf.scalar_type());
    TORCH_CHECK(nf.dim() == 1 && nf.size(0) == spec.size(0), "istft: n_frames must be [B] = [", spec.size(0),
                "], got shape ", nf.sizes());
  }
  const int64_t B = spec.size(0), L = istft_out_len(hop, spec.size(2));
  check_out("istft", out, spec, {B, L}, at::kFloat);
}

inline void check_dt(const char* op, const at::Tensor& x, const at::Tensor& dt) {
  check_same_device(op, x, dt, "dt");
  TORCH_CHECK(dt.numel() == 1, op, ": dt must be a 1-element tensor (kept on x's device to avoid a host sync), got ",
              dt.numel(), " elements");
  TORCH_CHECK(is_float_type(dt), op, ": dt must be a float tensor, got ", dt.scalar_type());
}

inline void check_cfg_v(const char* op, const at::Tensor& x, const at::Tensor& v) {
  check_float_contiguous(op, x, "x");
  check_float_contiguous(op, v, "v");
  check_same_device(op, x, v, "v");
  TORCH_CHECK(v.scalar_type() == x.scalar_type(), op, ": v has dtype ", v.scalar_type(), " but x has ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && v.dim() == x.dim(), op, ": x and v must have the same rank, got ", x.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(v.size(0) == 2 * x.size(0) && v.sizes().slice(1) == x.sizes().slice(1), op,
              ": v must be [2B, ...] (conditional rows first, then unconditional) for x [B, ...] = ", x.sizes(),
              ", got ", v.sizes());
}

inline void check_cfg_euler(const at::Tensor& out, const at::Tensor& x, const at::Tensor& v, const at::Tensor& dt) {
  check_cfg_v("cfg_euler", x, v);
  check_dt("cfg_euler", x, dt);
  check_out("cfg_euler", out, x, x.sizes(), x.scalar_type());
}

inline void check_cfg_euler_refresh(const at::Tensor& x, const at::Tensor& x_in, const at::Tensor& v,
                                    const at::Tensor& dt) {
  check_cfg_v("cfg_euler_refresh", x, v);
  check_dt("cfg_euler_refresh", x, dt);
  check_out("cfg_euler_refresh", x_in, x, v.sizes(), x.scalar_type());
}

inline void check_euler(const at::Tensor& out, const at::Tensor& x, const at::Tensor& v, const at::Tensor& dt) {
  check_float_contiguous("euler", x, "x");
  check_float_contiguous("euler", v, "v");
  check_same_device("euler", x, v, "v");
  TORCH_CHECK(v.sizes() == x.sizes() && v.scalar_type() == x.scalar_type(), "euler: v must match x (", x.sizes(), ", ",
              x.scalar_type(), "), got ", v.sizes(), ", ", v.scalar_type());
  check_dt("euler", x, dt);
  check_out("euler", out, x, x.sizes(), x.scalar_type());
}

}  // namespace chatterbox_rt
