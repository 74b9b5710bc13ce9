// Exact n-gram counts of a token stream cut into rows (chatterbox_rt.tokens.analyze), n = 1..K,
// no n-gram crossing a row boundary: for every n, the sizes of the groups of equal n-grams.
//
// Method: the windows (row positions with >= n tokens left in their row) are kept ordered by their
// n-gram, one level n at a time, by induced copying as in suffix sorting (Seward's copy method; the
// induced sorting of Nong, Zhang & Chan's SA-IS), here without recursion since K is small: if the
// windows are ordered by their n-gram, then a stable counting sort of the windows p - 1 by their
// own token, visiting p in that order, orders the windows by their (n + 1)-gram. Each level is one
// pass over the previous one:
//   - the bucket of window p - 1 is its token, and every bucket's size is known before the pass
//     (the token counts, less the windows that reach their row's end), so there is no histogram
//     pass; a bucket can end short of its space (pruned windows, below), its end is kept apart;
//   - two windows of a bucket are in one (n + 1)-gram group iff they came from one n-gram group, so
//     one "last source group" per bucket marks the group starts (flag bit 0 of each window);
//   - a window alone in its n-gram group stays alone at every longer n: it is not copied, but
//     counted once for each further level its row still has preceding tokens for;
//   - no window reads the token array back: each carries the tokens before it that the remaining
//     levels need (K - n of them, b = bit_length(vocab_size) bits each, top-aligned, 0 = before the
//     row start), in 12 bytes while they need more than 63 bits, then in 8.
// On the 2-core CI VM a scattered copy costs ~8-10 ns whatever the bucket count or item width (the
// stores, and loads that wait on them, bound it), so the copies are what to count: for 10 M speech
// tokens and n = 1..7, ~45 M (10 M into level 1, 10 M into level 2, ... 1.3 M into level 7), about
// 0.6 s. An LSD radix sort of the numpy path's three keys (39, 61 and 57 significant bits: 13
// passes of 13-bit digits, ~90 ms each here) would take twice that before any grouping. numpy's
// np.sort path (analyze.py _ngram_counts_fast) stays the reference and the fallback.
//
// Output per level n (row n - 1): the sizes of the groups of size >= 2 in lexicographic order of
// their n-grams (sizes[n - 1, :n_sizes[n - 1]]), and the number of n-grams seen once (ones[n - 1]).
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../ops.h"

namespace chatterbox_rt {
namespace {

// A window's carried tokens are digits of b bits, top-aligned (the token just before the window
// first; 0 = before the row start), and bit 0 of the last word is the group-start flag.
struct Narrow {  // <= 63 digit bits + the flag in one word
  using T = uint64_t;
  static uint64_t flag(const T& x) { return x & 1; }
  static uint32_t top(const T& x, int b) { return static_cast<uint32_t>(x >> (64 - b)); }
  static T sentinel() { return 1; }
  static void set_flag(T& o) { o |= 1; }
  // how many of the carried digits are nonzero (they are, up to the row start), via the lowest set bit
  static int carried(const T& x, const int* nz_of_z) {
    const uint64_t d = x & ~uint64_t{1};
    return d ? nz_of_z[64 + __builtin_ctzll(d)] : 0;
  }
};

struct Wide {  // <= 95 digit bits + the flag: a word and the top half of the next
  struct __attribute__((packed)) T {  // 12 bytes; 16 aligned ones measured no faster, and take a third more
    uint64_t hi;
    uint32_t lo;
  };
  static uint64_t flag(const T& x) { return x.lo & 1; }
  static uint32_t top(const T& x, int b) { return static_cast<uint32_t>(x.hi >> (64 - b)); }
  static T sentinel() { return T{0, 1}; }
  static void set_flag(T& o) { o.lo |= 1; }
  static int carried(const T& x, const int* nz_of_z) {
    const uint32_t lo = x.lo & ~uint32_t{1};
    if (lo) return nz_of_z[32 + __builtin_ctz(lo)];
    return x.hi ? nz_of_z[64 + __builtin_ctzll(x.hi)] : 0;
  }
};

// The carried digits of window p - 1: window p's without their first digit (0 < b <= 32).
inline uint64_t drop_first(const Narrow::T& x, int b, Narrow, uint64_t flag) { return ((x & ~uint64_t{1}) << b) | flag; }
inline uint64_t drop_first(const Wide::T& x, int b, Narrow, uint64_t flag) {
  return (x.hi << b) | ((x.lo & ~uint32_t{1}) >> (32 - b)) | flag;
}
inline Wide::T drop_first(const Wide::T& x, int b, Wide, uint64_t flag) {
  return Wide::T{(x.hi << b) | (x.lo >> (32 - b)), ((x.lo & ~uint32_t{1}) << b) | static_cast<uint32_t>(flag)};
}

constexpr int kNarrowBits = 63;  // above this many carried bits a window takes the wide format (kNgramCarryBits at most)

// Bucket d holds [start[d], fill[d]) of at most size[d] windows; bucket 0 (no preceding token:
// the window starts its row) is one dummy slot after the others that is written but never kept.
struct Layout {
  std::vector<int64_t> start, fill, size;
  int64_t slots = 0;  // total, with the dummy
};

struct Cursor {
  uint32_t fill, last;
};

struct State {
  int K = 0, b = 0;
  int64_t V = 0;
  std::vector<int64_t> rows_len, rows_end;  // non-empty rows
  std::vector<int64_t> avail;               // [d]: windows of token d with >= n tokens left, for the level n
  std::vector<Cursor> cursors;              // [d]: next free slot of bucket d, the group that last copied there
  int nz_of_z[128];  // lowest set bit of the carried digits -> how many leading digits are nonzero
  std::vector<int64_t> chain;  // [j]: this level's singletons with j preceding tokens carried
  int32_t* sizes = nullptr;    // [K, cap]
  int64_t cap = 0;
  int64_t* n_sizes = nullptr;
  int64_t* ones = nullptr;
};

void lay_out(State& s, Layout& l) {
  l.start.resize(s.V + 1);
  l.fill.resize(s.V + 1);
  l.size.resize(s.V + 1);
  int64_t at = 0;
  for (int64_t d = 1; d <= s.V; ++d) {
    l.start[d] = l.fill[d] = at;
    l.size[d] = s.avail[d];
    at += s.avail[d];
  }
  l.start[0] = l.fill[0] = at;
  l.size[0] = 0;
  l.slots = at + 1;
}

// After a level: mark where every bucket ends, so the next scan finds group ends by the flag alone.
template <class F>
void close_buckets(const Layout& l, typename F::T* dst) {
  for (size_t d = 0; d < l.fill.size(); ++d) {
    if (d == 0 || l.fill[d] < l.start[d] + l.size[d]) dst[l.fill[d]] = F::sentinel();  // else: the next
    // bucket's first window (always a group start) or the dummy follows
  }
}

// The windows with exactly n tokens left have no (n + 1)-gram: drop them from the next level's buckets.
template <class Tok>
void drop_row_ends(State& s, const Tok* tok, int n) {
  for (size_t r = 0; r < s.rows_len.size(); ++r)
    if (s.rows_len[r] >= n) --s.avail[static_cast<int64_t>(tok[s.rows_end[r] - n]) + 1];
}

void add_chains(State& s, int n) {
  // a singleton n-gram with j carried tokens is a singleton (n + q)-gram for q = 1..j
  const int slots = s.K - n;
  int64_t acc = 0;
  for (int q = slots; q >= 1; --q) {
    acc += s.chain[q];
    s.ones[n + q - 1] += acc;
  }
  std::fill(s.chain.begin(), s.chain.end(), 0);
}

// Scan level n (src, laid out as `from`): emit its groups; unless n == K, copy the windows of its
// groups of >= 2 into level n + 1 (dst, laid out as `to`).
template <class Src, class Dst, bool kCopy>
void level(State& s, int n, const typename Src::T* src, const Layout& from, typename Dst::T* dst, Layout& to) {
  const int b = s.b, slots = s.K - n;
  // the copy cursors of level n + 1, next to each bucket's last source group (one cache line a window)
  std::vector<Cursor>& cur = s.cursors;
  if (kCopy)
    for (int64_t d = 0; d <= s.V; ++d) cur[d] = Cursor{static_cast<uint32_t>(to.fill[d]), 0};
  Cursor* cu = cur.data();
  uint32_t gid = 0;  // this level's source groups, 1, 2, ... (last starts at 0)
  int32_t* sizes = s.sizes + (n - 1) * s.cap;
  int64_t n_big = 0, n_one = 0, full = 0;
  for (int64_t c = 1; c <= s.V; ++c) {
    const int64_t end = from.fill[c];
    for (int64_t t = from.start[c]; t < end;) {
      if (Src::flag(src[t + 1])) {  // a group of one
        ++n_one;
        if (slots) {
          const int j = Src::carried(src[t], s.nz_of_z);
          if (j >= slots)
            ++full;
          else
            ++s.chain[j];
        }
        ++t;
        continue;
      }
      int64_t e = t + 2;
      while (!Src::flag(src[e])) ++e;
      sizes[n_big++] = static_cast<int32_t>(e - t);
      ++gid;
      if (kCopy) {
        for (int64_t q = t; q < e; ++q) {
          const auto x = src[q];
          const uint32_t d = Src::top(x, b);
          Cursor& k = cu[d];
          const uint64_t start = k.last != gid;
          k.last = gid;
          dst[k.fill] = drop_first(x, b, Dst{}, start);
          k.fill += d != 0;
        }
      }
      t = e;
    }
  }
  s.n_sizes[n - 1] = n_big;
  s.ones[n - 1] += n_one;
  if (slots) s.chain[slots] += full;
  add_chains(s, n);
  if (kCopy) {
    for (int64_t d = 0; d <= s.V; ++d) to.fill[d] = cu[d].fill;
    close_buckets<Dst>(to, dst);
  }
}

// Level 1: every window, bucketed by its token, carrying the K - 1 tokens before it (F's digits).
template <class F, class Tok>
void build_level1(const State& s, const Tok* tok, Layout& l1, typename F::T* out) {
  const int b = s.b, carried_bits = (s.K - 1) * b;
  std::vector<uint32_t> fill(l1.fill.begin(), l1.fill.end());
  uint32_t* fp = fill.data();
  int64_t p = 0;
  for (size_t r = 0; r < s.rows_len.size(); ++r) {
    const int64_t end = s.rows_end[r];
    if constexpr (std::is_same_v<F, Narrow>) {
      const uint64_t keep = ~uint64_t{0} << (64 - carried_bits);
      uint64_t carry = 0;  // the tokens before p, the nearest first
      for (; p < end; ++p) {
        const uint64_t d = static_cast<uint64_t>(tok[p]) + 1;
        out[fp[d]++] = carry;
        carry = ((carry >> b) | (d << (64 - b))) & keep;
      }
    } else {
      const uint32_t keep_lo = carried_bits > 64 ? ~uint32_t{0} << (96 - carried_bits) : 0;  // bits in (63, 95]
      uint64_t hi = 0;
      uint32_t lo = 0;
      for (; p < end; ++p) {
        const uint64_t d = static_cast<uint64_t>(tok[p]) + 1;
        out[fp[d]++] = Wide::T{hi, lo};
        lo = ((lo >> b) | static_cast<uint32_t>(hi << (32 - b))) & keep_lo;
        hi = (hi >> b) | (d << (64 - b));
      }
    }
  }
  for (int64_t d = 0; d <= s.V; ++d) l1.fill[d] = fill[d];
  for (int64_t d = 1; d <= s.V; ++d)  // a bucket is one 1-gram group
    if (l1.fill[d] > l1.start[d]) F::set_flag(out[l1.start[d]]);
  close_buckets<F>(l1, out);
}

// Anonymous memory for the two level buffers, with transparent huge pages where the kernel offers
// them (as numpy does for large arrays): fewer, cheaper page faults on the ~25 N bytes touched.
class Scratch {
 public:
  explicit Scratch(size_t bytes) : bytes_(std::max<size_t>(bytes, 1)) {
#if defined(__linux__)
    p_ = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p_ != MAP_FAILED, "ngram_counts: could not allocate ", bytes_, " bytes of scratch memory");
#ifdef MADV_HUGEPAGE
    madvise(p_, bytes_, MADV_HUGEPAGE);
#endif
#else
    p_ = ::operator new(bytes_);
#endif
  }
  ~Scratch() {
#if defined(__linux__)
    munmap(p_, bytes_);
#else
    ::operator delete(p_);
#endif
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* get() const { return p_; }

 private:
  size_t bytes_;
  void* p_ = nullptr;
};

template <class Tok>
void count(State& s, const Tok* tok, int64_t N) {
  const int K = s.K, b = s.b;
  const int64_t V = s.V;
  s.avail.assign(V + 1, 0);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t t = static_cast<int64_t>(tok[i]);
    TORCH_CHECK(t >= 0 && t < V, "ngram_counts: tokens must lie in [0, vocab_size = ", V, "), found ", t,
                " at position ", i);
    ++s.avail[t + 1];
  }
  if (K == 1) {  // the token counts are the whole answer
    int64_t n_big = 0;
    for (int64_t d = 1; d <= V; ++d) {
      if (s.avail[d] == 1) ++s.ones[0];
      if (s.avail[d] >= 2) s.sizes[n_big++] = static_cast<int32_t>(s.avail[d]);
    }
    s.n_sizes[0] = n_big;
    return;
  }
  // Buffer a holds levels 1, 3, ..., buffer b levels 2, 4, ...; level n's windows carry K - n tokens,
  // in the wide format while they need more than 63 bits.
  auto is_wide = [&](int n) { return (K - n) * b > kNarrowBits; };
  auto item = [&](int n) { return is_wide(n) ? sizeof(Wide::T) : sizeof(Narrow::T); };
  const size_t slots = static_cast<size_t>(N) + 1;
  Scratch buf_a(item(1) * slots), buf_b(item(std::min(2, K)) * slots);
  Layout from;
  lay_out(s, from);
  if (is_wide(1))
    build_level1<Wide>(s, tok, from, static_cast<Wide::T*>(buf_a.get()));
  else
    build_level1<Narrow>(s, tok, from, static_cast<Narrow::T*>(buf_a.get()));
  void* cur = buf_a.get();
  for (int n = 1; n < K; ++n) {
    void* nxt = cur == buf_a.get() ? buf_b.get() : buf_a.get();
    Layout to;
    drop_row_ends(s, tok, n);
    lay_out(s, to);
    if (is_wide(n) && is_wide(n + 1))
      level<Wide, Wide, true>(s, n, static_cast<Wide::T*>(cur), from, static_cast<Wide::T*>(nxt), to);
    else if (is_wide(n))
      level<Wide, Narrow, true>(s, n, static_cast<Wide::T*>(cur), from, static_cast<Narrow::T*>(nxt), to);
    else
      level<Narrow, Narrow, true>(s, n, static_cast<Narrow::T*>(cur), from, static_cast<Narrow::T*>(nxt), to);
    from = std::move(to);
    cur = nxt;
  }
  Layout none;
  level<Narrow, Narrow, false>(s, K, static_cast<Narrow::T*>(cur), from, nullptr, none);
}

}  // namespace

void ngram_counts_cpu(at::Tensor& sizes, at::Tensor& n_sizes, at::Tensor& ones, const at::Tensor& tokens,
                      const at::Tensor& lengths, int64_t vocab_size) {
  check_ngram_counts(sizes, n_sizes, ones, tokens, lengths, vocab_size);
  TORCH_CHECK(tokens.device().is_cpu(), "ngram_counts: the CPU kernel got a tensor on ", tokens.device());
  const int K = static_cast<int>(sizes.size(0));
  const int b = ngram_digit_bits(vocab_size);
  const int64_t N = tokens.numel();
  TORCH_CHECK(N < (int64_t{1} << 31), "ngram_counts: at most 2^31 - 1 tokens, got ", N);  // 32-bit slots and sizes
  State s;
  s.K = K;
  s.b = b;
  s.V = vocab_size;
  s.cap = sizes.size(1);
  s.sizes = sizes.data_ptr<int32_t>();
  s.n_sizes = n_sizes.data_ptr<int64_t>();
  s.ones = ones.data_ptr<int64_t>();
  std::fill(s.n_sizes, s.n_sizes + K, 0);
  std::fill(s.ones, s.ones + K, 0);

  const int64_t* len = lengths.const_data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t r = 0; r < lengths.numel(); ++r) {
    TORCH_CHECK(len[r] >= 0, "ngram_counts: lengths must be >= 0, got ", len[r], " for row ", r);
    total += len[r];
    if (len[r] > 0) {
      s.rows_len.push_back(len[r]);
      s.rows_end.push_back(total);
    }
  }
  TORCH_CHECK(total == N, "ngram_counts: the row lengths add up to ", total, " but there are ", N, " tokens");
  // A level has at most windows / 2 groups of >= 2; the first level has the most windows.
  TORCH_CHECK(s.cap >= N / 2, "ngram_counts: sizes must have room for N / 2 = ", N / 2, " groups per level, got ",
              s.cap);
  if (N == 0) return;
  s.cursors.resize(vocab_size + 1);
  s.chain.assign(K + 1, 0);
  for (int z = 0; z < 128; ++z) s.nz_of_z[z] = (127 - z) / b + 1;  // bit z of 128, digits from bit 127 down

  switch (tokens.scalar_type()) {
    case at::kByte: count(s, tokens.const_data_ptr<uint8_t>(), N); break;
    case at::kShort: count(s, tokens.const_data_ptr<int16_t>(), N); break;
    case at::kInt: count(s, tokens.const_data_ptr<int32_t>(), N); break;
    case at::kLong: count(s, tokens.const_data_ptr<int64_t>(), N); break;
    default: TORCH_CHECK(false, "ngram_counts: unsupported token dtype ", tokens.scalar_type());
  }
}

TORCH_LIBRARY_IMPL(chatterbox_rt, CPU, m) { m.impl("ngram_counts", &ngram_counts_cpu); }

}  // namespace chatterbox_rt
