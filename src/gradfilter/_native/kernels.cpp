// Native CPU kernels for the full-resolution passes of gradient filtering (docs/spec.md §4) and of the
// lean activations (src/gradfilter/lean.py).
//
// Two passes over full-resolution maps are all the filtered convolution needs: summing a map over
// a grid of patches (x̃ in the forward, the patch sums of gy in the backward) and repeating a
// patch-resolution gradient over its patches (gx). In PyTorch ops each is several strided adds,
// pads and copies; here each is one parallel loop over (batch x channel) planes that reads or
// writes every full-resolution element once.
//
// Geometry of one axis: patch i covers positions [i*k - pad, (i+1)*k - pad) of a map of length n;
// pad > 0 means the grid starts before the map (those positions are zero padding), pad < 0 that
// it starts inside it. Positions of the map outside the grid belong to no patch.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define GF_HAVE_AVX2_TARGET 1
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace {

// Which vector paths the kernels may take (native.use_simd), read on every dispatch, set between
// calls: 2 all this CPU has (AVX2/AVX-512 where present), 1 the 4-lane paths alone (SSE2 on
// x86, NEON on AArch64: what ARM boards run, testable on x86), 0 the portable scalar paths.
std::atomic<int64_t> simd_level{2};

int64_t set_simd(int64_t level) { return simd_level.exchange(std::clamp<int64_t>(level, 0, 2)); }

inline bool simd() { return simd_level.load(std::memory_order_relaxed) > 0; }

// Whether the AVX2/AVX-512 paths may run (with the CPU's support, checked where they are).
inline bool wide_simd() { return simd_level.load(std::memory_order_relaxed) > 1; }

// 4-lane float vectors (GF_V4): one set of helpers over SSE2 (x86-64 baseline) and NEON (AArch64
// baseline, the Pi 4's Cortex-A72 included), so the 4-lane kernel paths are one code for both
// ISAs. Intrinsics rather than auto-vectorisation or at::vec: the lane order of every sum is
// fixed in the source (deterministic, the same on both ISAs, no compiler heuristics), NaN and
// ±0 behave as the x86 instructions do (below), and the build needs no -march. With
// -ffp-contract=off a multiply and an add stay two roundings on AArch64 too.
#if defined(__SSE2__)
#define GF_V4 1
constexpr bool kNeon = false;
using v4 = __m128;
inline v4 v4_load(const float* p) { return _mm_loadu_ps(p); }
inline void v4_store(float* p, v4 v) { _mm_storeu_ps(p, v); }
inline v4 v4_set1(float x) { return _mm_set1_ps(x); }
inline v4 v4_zero() { return _mm_setzero_ps(); }
inline v4 v4_all() { return _mm_castsi128_ps(_mm_set1_epi32(-1)); }
inline v4 v4_add(v4 a, v4 b) { return _mm_add_ps(a, b); }
inline v4 v4_sub(v4 a, v4 b) { return _mm_sub_ps(a, b); }
inline v4 v4_mul(v4 a, v4 b) { return _mm_mul_ps(a, b); }
inline v4 v4_max(v4 a, v4 b) { return _mm_max_ps(a, b); }
inline v4 v4_min(v4 a, v4 b) { return _mm_min_ps(a, b); }
inline v4 v4_gt(v4 a, v4 b) { return _mm_cmpgt_ps(a, b); }
inline v4 v4_lt(v4 a, v4 b) { return _mm_cmplt_ps(a, b); }
inline v4 v4_and(v4 a, v4 b) { return _mm_and_ps(a, b); }
inline int v4_movemask(v4 m) { return _mm_movemask_ps(m); }
inline void v4_transpose(v4& a, v4& b, v4& c, v4& d) { _MM_TRANSPOSE4_PS(a, b, c, d); }
// 8 bytes widened to floats: lanes 0-3 and 4-7
inline void v4_bytes8(const uint8_t* p, v4& lo, v4& hi) {
  const __m128i zero = _mm_setzero_si128();
  const __m128i w = _mm_unpacklo_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), zero);
  lo = _mm_cvtepi32_ps(_mm_unpacklo_epi16(w, zero));
  hi = _mm_cvtepi32_ps(_mm_unpackhi_epi16(w, zero));
}
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define GF_V4 1
constexpr bool kNeon = true;
using v4 = float32x4_t;
inline v4 v4_load(const float* p) { return vld1q_f32(p); }
inline void v4_store(float* p, v4 v) { vst1q_f32(p, v); }
inline v4 v4_set1(float x) { return vdupq_n_f32(x); }
inline v4 v4_zero() { return vdupq_n_f32(0.0f); }
inline v4 v4_all() { return vreinterpretq_f32_u32(vdupq_n_u32(~0u)); }
inline v4 v4_add(v4 a, v4 b) { return vaddq_f32(a, b); }
inline v4 v4_sub(v4 a, v4 b) { return vsubq_f32(a, b); }
inline v4 v4_mul(v4 a, v4 b) { return vmulq_f32(a, b); }
// maxps / minps: a > b ? a : b (b where either is NaN, and for ±0), unlike fmax / fmin
inline v4 v4_max(v4 a, v4 b) { return vbslq_f32(vcgtq_f32(a, b), a, b); }
inline v4 v4_min(v4 a, v4 b) { return vbslq_f32(vcltq_f32(a, b), a, b); }
inline v4 v4_gt(v4 a, v4 b) { return vreinterpretq_f32_u32(vcgtq_f32(a, b)); }
inline v4 v4_lt(v4 a, v4 b) { return vreinterpretq_f32_u32(vcltq_f32(a, b)); }
inline v4 v4_and(v4 a, v4 b) {
  return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(a), vreinterpretq_u32_f32(b)));
}
inline int v4_movemask(v4 m) {  // the lanes' sign bits as bits 0-3
  const int32x4_t shift = {0, 1, 2, 3};
  return static_cast<int>(
      vaddvq_u32(vshlq_u32(vshrq_n_u32(vreinterpretq_u32_f32(m), 31), shift)));
}
inline void v4_transpose(v4& a, v4& b, v4& c, v4& d) {
  const float32x4x2_t ab = vtrnq_f32(a, b), cd = vtrnq_f32(c, d);
  a = vcombine_f32(vget_low_f32(ab.val[0]), vget_low_f32(cd.val[0]));
  b = vcombine_f32(vget_low_f32(ab.val[1]), vget_low_f32(cd.val[1]));
  c = vcombine_f32(vget_high_f32(ab.val[0]), vget_high_f32(cd.val[0]));
  d = vcombine_f32(vget_high_f32(ab.val[1]), vget_high_f32(cd.val[1]));
}
inline void v4_bytes8(const uint8_t* p, v4& lo, v4& hi) {
  const uint16x8_t w = vmovl_u8(vld1_u8(p));
  lo = vcvtq_f32_u32(vmovl_u16(vget_low_u16(w)));
  hi = vcvtq_f32_u32(vmovl_u16(vget_high_u16(w)));
}
#endif

constexpr int64_t kGrainElements = 1 << 15;  // full-resolution elements per parallel work item

int64_t grain_for(int64_t plane) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(plane, 1)); }

void check_geometry(int64_t k, int64_t patches, const char* axis) {
  TORCH_CHECK(k >= 1, "gradfilter native: patch length along ", axis, " must be >= 1, got ", k);
  TORCH_CHECK(patches >= 1, "gradfilter native: patch count along ", axis, " must be >= 1, got ", patches);
}

// [start, end) of each patch along one axis, clipped to the map (empty when off the map)
std::vector<std::pair<int64_t, int64_t>> segments(int64_t n, int64_t k, int64_t pad, int64_t patches) {
  std::vector<std::pair<int64_t, int64_t>> seg(patches);
  for (int64_t i = 0; i < patches; ++i) {
    const int64_t lo = std::max<int64_t>(i * k - pad, 0), hi = std::min<int64_t>((i + 1) * k - pad, n);
    seg[i] = {std::min(lo, hi), hi};
  }
  return seg;
}

// patch of every position along one axis, -1 off the grid
std::vector<int64_t> position_patch(int64_t n, int64_t k, int64_t pad, int64_t patches) {
  std::vector<int64_t> patch(n, -1);
  for (int64_t h = 0; h < n; ++h)
    if (h + pad >= 0 && h + pad < patches * k) patch[h] = (h + pad) / k;
  return patch;
}

template <typename acc_t>
inline acc_t segment_sum(const acc_t* row, std::pair<int64_t, int64_t> seg) {
  acc_t s = acc_t(0);
  for (int64_t w = seg.first; w < seg.second; ++w) s += row[w];
  return s;
}

// out[j] = sum of row[j*K - left .. +K) for the interior patches j in [j0, j1)
template <int K, typename acc_t, typename scalar_t>
inline void interior_sums(const acc_t* __restrict__ row, scalar_t* __restrict__ out, int64_t j0,
                          int64_t j1, int64_t left) {
  for (int64_t j = j0; j < j1; ++j) {
    const acc_t* r = row + j * K - left;
    acc_t s = r[0];
    for (int t = 1; t < K; ++t) s += r[t];
    out[j] = scalar_t(s);
  }
}

// Tiny planes (a 7×7 map in 2×2 patches): the per-row loops below have trip counts of 2-4 and
// cost more than the adds. Here each patch is summed over its pixel list for 8 planes at once,
// so that the 8 sums are independent (throughput- rather than latency-bound).
constexpr int64_t kTinyPixels = 256, kTinyPatches = 16, kTinyPlanes = 8;

bool tiny_planes(int64_t H, int64_t W, int64_t Ph, int64_t Pw) {
  return H * W <= kTinyPixels && Ph * Pw <= kTinyPatches;
}

template <typename scalar_t>
void tiny_patch_sum_kernel(const scalar_t* src, scalar_t* dst, int64_t planes, int64_t H, int64_t W,
                           int64_t kh, int64_t kw, int64_t top, int64_t left, int64_t Ph, int64_t Pw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = H * W, P = Ph * Pw;
  const auto rows = segments(H, kh, top, Ph), cols = segments(W, kw, left, Pw);
  // the pixels of each patch, patch after patch: patch k owns pixels[first[k], first[k + 1])
  std::vector<int64_t> pixels, first(P + 1, 0);
  for (int64_t i = 0; i < Ph; ++i)
    for (int64_t j = 0; j < Pw; ++j) {
      for (int64_t h = rows[i].first; h < rows[i].second; ++h)
        for (int64_t w = cols[j].first; w < cols[j].second; ++w) pixels.push_back(h * W + w);
      first[i * Pw + j + 1] = static_cast<int64_t>(pixels.size());
    }
  const int64_t blocks = (planes + kTinyPlanes - 1) / kTinyPlanes;
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrainElements / (kTinyPlanes * HW)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t p0 = b * kTinyPlanes, count = std::min(kTinyPlanes, planes - p0);
      const scalar_t* in = src + p0 * HW;
      for (int64_t k = 0; k < P; ++k) {
        acc_t acc[kTinyPlanes] = {};  // 8 independent sums, one per plane: kept in registers
        if (count == kTinyPlanes) {
          for (int64_t e = first[k]; e < first[k + 1]; ++e) {
            const scalar_t* px = in + pixels[e];
            for (int64_t j = 0; j < kTinyPlanes; ++j) acc[j] += acc_t(px[j * HW]);
          }
        } else {
          for (int64_t e = first[k]; e < first[k + 1]; ++e)
            for (int64_t j = 0; j < count; ++j) acc[j] += acc_t(in[j * HW + pixels[e]]);
        }
        for (int64_t j = 0; j < count; ++j) dst[(p0 + j) * P + k] = scalar_t(acc[j]);
      }
    }
  });
}

// dst: the patch sums of every (H, W) plane of src. The loop body stays in this lambda: moved
// into a helper function, GCC compiled it 2.5× slower.
template <typename scalar_t>
void patch_sum_kernel(const scalar_t* src, scalar_t* dst, int64_t planes, int64_t H, int64_t W,
                      int64_t kh, int64_t kw, int64_t top, int64_t left, int64_t Ph, int64_t Pw) {
  if (tiny_planes(H, W, Ph, Pw)) {
    tiny_patch_sum_kernel(src, dst, planes, H, W, kh, kw, top, left, Ph, Pw);
    return;
  }
  using acc_t = at::opmath_type<scalar_t>;
  const auto rows = segments(H, kh, top, Ph), cols = segments(W, kw, left, Pw);
  // interior column patches: those lying wholly inside the map
  int64_t j0 = 0, j1 = Pw;
  while (j0 < Pw && cols[j0].second - cols[j0].first < kw) ++j0;
  while (j1 > j0 && cols[j1 - 1].second - cols[j1 - 1].first < kw) --j1;
  at::parallel_for(0, planes, grain_for(H * W), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(W);
    acc_t* __restrict__ row = buf.data();
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t* in = src + p * H * W;
      scalar_t* __restrict__ out = dst + p * Ph * Pw;
      for (int64_t i = 0; i < Ph; ++i) {
        const auto [h0, h1] = rows[i];
        if (h0 == h1) {
          for (int64_t j = 0; j < Pw; ++j) out[i * Pw + j] = scalar_t(0);
          continue;
        }
        // the patch row's rows summed into one row (contiguous, vectorisable)
        const scalar_t* __restrict__ r0 = in + h0 * W;
        for (int64_t w = 0; w < W; ++w) row[w] = acc_t(r0[w]);
        for (int64_t h = h0 + 1; h < h1; ++h) {
          const scalar_t* __restrict__ r = in + h * W;
          for (int64_t w = 0; w < W; ++w) row[w] += acc_t(r[w]);
        }
        scalar_t* __restrict__ o = out + i * Pw;
        for (int64_t j = 0; j < j0; ++j) o[j] = scalar_t(segment_sum(row, cols[j]));
        switch (kw) {  // full-width interior patches, with the width known to the compiler
          case 2: interior_sums<2>(row, o, j0, j1, left); break;
          case 3: interior_sums<3>(row, o, j0, j1, left); break;
          case 4: interior_sums<4>(row, o, j0, j1, left); break;
          default:
            for (int64_t j = j0; j < j1; ++j) o[j] = scalar_t(segment_sum(row, cols[j]));
        }
        for (int64_t j = std::max(j0, j1); j < Pw; ++j) o[j] = scalar_t(segment_sum(row, cols[j]));
      }
    }
  });
}

// Outputs at least this large are written with streaming (non-temporal) stores: they cannot stay
// in the cache anyway, and streaming skips reading every destination line before writing it.
constexpr int64_t kStreamBytes = int64_t(32) << 20;

// row[0, W) to dst: streaming stores for float rows that start 16-byte aligned, else memcpy
template <typename scalar_t>
inline void write_row(scalar_t* __restrict__ dst, const scalar_t* __restrict__ row, int64_t W,
                      bool stream) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stream && simd() && (reinterpret_cast<std::uintptr_t>(dst) & 15) == 0) {
      int64_t w = 0;
      for (; w + 4 <= W; w += 4) _mm_stream_ps(dst + w, _mm_loadu_ps(row + w));
      for (; w < W; ++w) dst[w] = row[w];
      return;
    }
  }
#endif
  std::memcpy(dst, row, W * sizeof(scalar_t));
}

// dst (N, C, H, W): each patch value repeated over its patch. The source planes are (N, C, Ph, Pw)
// or, with channel_major, (C, N, Ph, Pw) (the patch-resolution GEMM's output, not transposed).
template <typename scalar_t>
void unpool_kernel(const scalar_t* src, scalar_t* dst, int64_t N, int64_t C, int64_t H, int64_t W,
                   int64_t kh, int64_t kw, int64_t top, int64_t left, int64_t Ph, int64_t Pw,
                   bool channel_major = false) {
  const auto cols = segments(W, kw, left, Pw);
  const auto row_patch = position_patch(H, kh, top, Ph);
  const int64_t planes = N * C;
  const bool stream = planes * H * W * int64_t(sizeof(scalar_t)) >= kStreamBytes;
  at::parallel_for(0, planes, grain_for(H * W), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> buf(W);  // the current patch row's output row, built once
    scalar_t* __restrict__ row = buf.data();
    for (int64_t p = begin; p < end; ++p) {
      const int64_t source = channel_major ? (p % C) * N + p / C : p;
      const scalar_t* in = src + source * Ph * Pw;
      scalar_t* __restrict__ out = dst + p * H * W;
      int64_t built = -2;  // patch row held in `row` (-1: a zero row)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t i = row_patch[h];
        if (i != built) {
          built = i;
          std::fill(row, row + W, scalar_t(0));
          if (i >= 0) {
            const scalar_t* g = in + i * Pw;
            for (int64_t j = 0; j < Pw; ++j) {
              const scalar_t v = g[j];
              for (int64_t w = cols[j].first; w < cols[j].second; ++w) row[w] = v;
            }
          }
        }
        write_row(out + h * W, row, W, stream);
      }
    }
#if defined(__SSE2__)
    if (stream) _mm_sfence();  // streaming stores are weakly ordered: publish them
#endif
  });
}

// Channels-last (NHWC) maps: the same passes, vectorised over the contiguous channels, for
// models run with memory_format=torch.channels_last (often the faster format for oneDNN on CPU).
template <typename scalar_t>
void patch_sum_nhwc(const scalar_t* src, scalar_t* dst, int64_t N, int64_t C, int64_t H,
                    int64_t W, int64_t kh, int64_t kw, int64_t top, int64_t left, int64_t Ph,
                    int64_t Pw) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto rows = segments(H, kh, top, Ph), cols = segments(W, kw, left, Pw);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(kh * W * C, 1));
  at::parallel_for(0, N * Ph, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(C);
    acc_t* __restrict__ acc = buf.data();
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / Ph, i = q % Ph;
      for (int64_t j = 0; j < Pw; ++j) {
        for (int64_t c = 0; c < C; ++c) acc[c] = acc_t(0);
        for (int64_t h = rows[i].first; h < rows[i].second; ++h)
          for (int64_t w = cols[j].first; w < cols[j].second; ++w) {
            const scalar_t* __restrict__ px = src + ((n * H + h) * W + w) * C;
            for (int64_t c = 0; c < C; ++c) acc[c] += acc_t(px[c]);
          }
        scalar_t* __restrict__ o = dst + ((n * Ph + i) * Pw + j) * C;
        for (int64_t c = 0; c < C; ++c) o[c] = scalar_t(acc[c]);
      }
    }
  });
}

template <typename scalar_t>
void unpool_nhwc(const scalar_t* src, scalar_t* dst, int64_t N, int64_t C, int64_t H, int64_t W,
                 int64_t kh, int64_t kw, int64_t top, int64_t left, int64_t Ph, int64_t Pw) {
  const auto row_patch = position_patch(H, kh, top, Ph), col_patch = position_patch(W, kw, left, Pw);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(W * C, 1));
  at::parallel_for(0, N * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / H, i = row_patch[q % H];
      scalar_t* o = dst + q * W * C;
      for (int64_t w = 0; w < W; ++w) {
        const int64_t j = col_patch[w];
        if (i < 0 || j < 0)
          std::fill(o + w * C, o + (w + 1) * C, scalar_t(0));
        else
          std::memcpy(o + w * C, src + ((n * Ph + i) * Pw + j) * C, C * sizeof(scalar_t));
      }
    }
  });
}

// NHWC when the tensor is channels-last and not also plain-contiguous (ambiguous shapes stay NCHW)
bool is_nhwc(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor patch_sum(const at::Tensor& x, int64_t kh, int64_t kw, int64_t top, int64_t left,
                     int64_t Ph, int64_t Pw) {
  TORCH_CHECK(x.dim() == 4, "gradfilter native patch_sum: expected a 4-D tensor, got ", x.dim(), "-D");
  check_geometry(kh, Ph, "height");
  check_geometry(kw, Pw, "width");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (is_nhwc(x)) {
    at::Tensor out = at::empty({N, C, Ph, Pw}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    if (out.numel() == 0) return out;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gf_patch_sum_nhwc", [&] {
      patch_sum_nhwc<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), N,
                               C, H, W, kh, kw, top, left, Ph, Pw);
    });
    return out;
  }
  const at::Tensor src = x.contiguous();
  at::Tensor out = at::empty({N, C, Ph, Pw}, src.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "gf_patch_sum", [&] {
    patch_sum_kernel<scalar_t>(src.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                               N * C, H, W, kh, kw, top, left, Ph, Pw);
  });
  return out;
}

at::Tensor unpool(const at::Tensor& g, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t top,
                  int64_t left) {
  TORCH_CHECK(g.dim() == 4, "gradfilter native unpool: expected a 4-D tensor, got ", g.dim(), "-D");
  TORCH_CHECK(H >= 0 && W >= 0, "gradfilter native unpool: negative output size");
  const int64_t N = g.size(0), C = g.size(1), Ph = g.size(2), Pw = g.size(3);
  check_geometry(kh, Ph, "height");
  check_geometry(kw, Pw, "width");
  if (is_nhwc(g)) {
    at::Tensor out = at::empty({N, C, H, W}, g.options().memory_format(at::MemoryFormat::ChannelsLast));
    if (out.numel() == 0) return out;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gf_unpool_nhwc", [&] {
      unpool_nhwc<scalar_t>(g.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), N, C,
                            H, W, kh, kw, top, left, Ph, Pw);
    });
    return out;
  }
  const at::Tensor src = g.contiguous();
  at::Tensor out = at::empty({N, C, H, W}, src.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "gf_unpool", [&] {
    unpool_kernel<scalar_t>(src.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                            N, C, H, W, kh, kw, top, left, Ph, Pw);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// The whole filtered backward of a dense 2-D convolution with summed taps (docs/spec.md §4.1–§4.5) in
// one call, on plain (NCHW) maps: gy's patch sums are reordered at patch resolution into the
// channel-major matrix the GEMMs take, already scaled, with the bias gradient from the same
// pass; W̃ and the tap expansion of gW̃ are single loops; gx is unpooled straight from the
// GEMM's channel-major output. Against the same steps as PyTorch ops called from Python this
// saves several small tensor passes and about ten operator calls, which dominate on small maps.

// n-major (N, C, P) patch sums to channel-major (C, N, P), times scale · map[patch], with the
// channels' plain totals
template <typename scalar_t>
void to_channel_major(const scalar_t* sums, scalar_t* dst, scalar_t* csum, int64_t N, int64_t C,
                      int64_t P, double scale, const scalar_t* map) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t s = acc_t(scale);
  at::parallel_for(0, C, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(N * P, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      acc_t total = acc_t(0);
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t* in = sums + (n * C + c) * P;
        scalar_t* out = dst + (c * N + n) * P;
        for (int64_t k = 0; k < P; ++k) {
          const acc_t v = acc_t(in[k]);
          total += v;
          out[k] = scalar_t(map ? v * s * acc_t(map[k]) : v * s);
        }
      }
      csum[c] = scalar_t(total);
    }
  });
}

// The full-resolution map is read in its own (n-major) order, the faster pass; the reordering
// to channel-major happens at patch resolution.
std::tuple<at::Tensor, at::Tensor> patch_sum_cm(const at::Tensor& x, int64_t kh, int64_t kw,
                                                int64_t top, int64_t left, int64_t Ph, int64_t Pw,
                                                double scale, const std::optional<at::Tensor>& map) {
  TORCH_CHECK(x.dim() == 4, "gradfilter native patch_sum_cm: expected a 4-D tensor, got ", x.dim(), "-D");
  check_geometry(kh, Ph, "height");
  check_geometry(kw, Pw, "width");
  const at::Tensor src = x.contiguous();
  const int64_t N = src.size(0), C = src.size(1), H = src.size(2), W = src.size(3);
  at::Tensor out = at::empty({C, N, Ph, Pw}, src.options());
  at::Tensor csum = at::empty({C}, src.options());
  at::Tensor m;
  if (map.has_value() && map->defined()) {
    TORCH_CHECK(map->numel() == Ph * Pw, "gradfilter native patch_sum_cm: the scale map needs ", Ph * Pw,
                " values, got ", map->numel());
    m = map->to(src.scalar_type()).contiguous();
  }
  if (out.numel() == 0) return {out, csum.zero_()};
  at::Tensor sums = at::empty({N, C, Ph, Pw}, src.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "gf_patch_sum_cm", [&] {
    patch_sum_kernel<scalar_t>(src.const_data_ptr<scalar_t>(), sums.mutable_data_ptr<scalar_t>(),
                               N * C, H, W, kh, kw, top, left, Ph, Pw);
    to_channel_major<scalar_t>(sums.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                               csum.mutable_data_ptr<scalar_t>(), N, C, Ph * Pw, scale,
                               m.defined() ? m.const_data_ptr<scalar_t>() : nullptr);
  });
  return {out, csum};
}

// W̃ (Cout, Cin): the kernel summed over its taps
at::Tensor tap_sum(const at::Tensor& weight) {
  const at::Tensor w = weight.contiguous();
  const int64_t rows = w.size(0) * w.size(1), taps = w.numel() / std::max<int64_t>(rows, 1);
  at::Tensor out = at::empty({w.size(0), w.size(1)}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "gf_tap_sum", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = w.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(taps, 1)),
                     [&](int64_t b, int64_t e) {
      // 16 rows at a time: independent sums instead of one dependent chain per row (10× faster)
      constexpr int64_t B = 16;
      int64_t r = b;
      for (; r + B <= e; r += B) {
        acc_t acc[B] = {};
        const scalar_t* block = src + r * taps;
        for (int64_t t = 0; t < taps; ++t)
          for (int64_t j = 0; j < B; ++j) acc[j] += acc_t(block[j * taps + t]);
        for (int64_t j = 0; j < B; ++j) dst[r + j] = scalar_t(acc[j]);
      }
      for (; r < e; ++r) {
        acc_t acc = acc_t(0);
        for (int64_t t = 0; t < taps; ++t) acc += acc_t(src[r * taps + t]);
        dst[r] = scalar_t(acc);
      }
    });
  });
  return out;
}

// gW (Cout, Cin, kh, kw): every tap gets its (Cout, Cin) entry of gW̃
at::Tensor expand_taps(const at::Tensor& gw, int64_t kh, int64_t kw) {
  const at::Tensor src = gw.contiguous();
  const int64_t rows = src.numel(), taps = kh * kw;
  at::Tensor out = at::empty({src.size(0), src.size(1), kh, kw}, src.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "gf_expand_taps", [&] {
    const scalar_t* in = src.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / taps), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) std::fill(dst + r * taps, dst + (r + 1) * taps, in[r]);
    });
  });
  return out;
}

// (gx, gW, gb) of a filtered dense conv from gy (N, Cout, Ho, Wo) and the input patch sums xt
// (N, Cin, Ph, Pw). Entries not asked for come back empty.
// gx (N, C, H, W) from g̃x at patch resolution, channel-major (C, N·Ph·Pw): by one GEMM with
// the tiny-map unpooling matrix pool_in (H·W, Ph·Pw) where given, else by the unpooling pass
// reading the channel-major source directly.
at::Tensor unpool_channel_major(const at::Tensor& gxt, int64_t N, int64_t H, int64_t W,
                                int64_t kh, int64_t kw, int64_t top, int64_t left, int64_t Ph,
                                int64_t Pw, const std::optional<at::Tensor>& pool_in) {
  const int64_t C = gxt.size(0), P = Ph * Pw;
  if (pool_in.has_value() && pool_in->defined()) {  // tiny maps: unpool by one GEMM
    TORCH_CHECK(pool_in->dim() == 2 && pool_in->size(0) == H * W && pool_in->size(1) == P,
                "gradfilter native: the unpooling matrix must be (", H * W, ", ", P, ")");
    const at::Tensor rows = gxt.view({C, N, P}).transpose(0, 1).reshape({N * C, P});
    return at::mm(rows, pool_in->to(gxt.scalar_type()).t()).view({N, C, H, W});
  }
  at::Tensor gx = at::empty({N, C, H, W}, gxt.options());
  if (gx.numel() > 0) {
    const at::Tensor src = gxt.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "gf_unpool_cm", [&] {
      unpool_kernel<scalar_t>(src.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), N,
                              C, H, W, kh, kw, top, left, Ph, Pw, true);
    });
  }
  return gx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> filtered_backward(
    const at::Tensor& gy, const at::Tensor& xt, const at::Tensor& weight, int64_t kh, int64_t kw,
    int64_t rh, int64_t rw, int64_t out_top, int64_t out_left, int64_t Ph, int64_t Pw,
    int64_t in_kh, int64_t in_kw, int64_t in_top, int64_t in_left, int64_t H, int64_t W,
    double scale, const std::optional<at::Tensor>& map, bool need_x, bool need_w,
    const std::optional<at::Tensor>& pool_in) {
  TORCH_CHECK(gy.dim() == 4, "gradfilter native filtered_backward: expected a 4-D gy");
  const int64_t N = gy.size(0), P = Ph * Pw;
  auto [g_cm, gb] = patch_sum_cm(gy, rh, rw, out_top, out_left, Ph, Pw, scale, map);
  const at::Tensor g2 = g_cm.view({g_cm.size(0), N * P});
  const at::Tensor empty = at::empty({0}, gy.options());
  at::Tensor gw = empty, gx = empty;
  if (need_w) {
    TORCH_CHECK(xt.dim() == 4 && xt.size(0) == N && xt.size(2) == Ph && xt.size(3) == Pw,
                "gradfilter native filtered_backward: xt must be (N, Cin, Ph, Pw)");
    // channel-major copy of x̃ at patch resolution (in the forward, the n-major patch sums are
    // the faster pass over the full-resolution x)
    const at::Tensor x2 = xt.to(gy.scalar_type()).transpose(0, 1).reshape({xt.size(1), N * P});
    gw = expand_taps(at::mm(g2, x2.t()), kh, kw);
  }
  if (need_x) {
    const at::Tensor wsum = tap_sum(weight.to(gy.scalar_type()));  // (Cout, Cin)
    TORCH_CHECK(wsum.size(0) == g2.size(0), "gradfilter native filtered_backward: weight has ",
                wsum.size(0), " output channels, gy ", g2.size(0));
    const at::Tensor gxt = at::mm(wsum.t(), g2);  // (Cin, N·P), channel-major
    gx = unpool_channel_major(gxt, N, H, W, in_kh, in_kw, in_top, in_left, Ph, Pw, pool_in);
  }
  return {gx, gw, gb};
}

// Lean ReLU / ReLU6: y = clamp(x, 0, upper) and the gradient mask (0 < x < upper) packed 8 to a
// byte (bit i of byte b is element 8b+i, as lean.pack_bits), in one pass; the backward applies the
// mask to the gradient in one pass.
// 8 mask bytes (0 or 1) <-> one byte of bits, by multiplication (no per-bit loop): multiplying
// eight 0/1 bytes by kGather moves byte k's bit to bit 56 + k with no carries.
constexpr uint64_t kGather = 0x0102040810204080ULL;
constexpr uint64_t kSpread = 0x0101010101010101ULL;
constexpr uint64_t kSelect = 0x8040201008040201ULL;

inline uint8_t pack8(const uint8_t* m) {
  uint64_t word;
  std::memcpy(&word, m, 8);
  return static_cast<uint8_t>((word * kGather) >> 56);
}

inline void unpack8(uint8_t packed, uint8_t* m) {
  const uint64_t word = (static_cast<uint64_t>(packed) * kSpread) & kSelect;
  std::memcpy(m, &word, 8);  // byte k is nonzero (not 1) iff bit k is set
}

// integers that may alias a floating-point element (GCC/Clang), to select its bits
typedef uint16_t __attribute__((__may_alias__)) alias_u16;
typedef uint32_t __attribute__((__may_alias__)) alias_u32;
typedef uint64_t __attribute__((__may_alias__)) alias_u64;

constexpr int64_t kBlock = 1024;  // elements per inner block (a multiple of 8)

#if defined(GF_V4)
// float, 4-lane vectors: compare and movemask give the 8 mask bits directly. v4_max/v4_min return
// their second operand when one is NaN, so max(0, x) and min(hi, .) keep NaN as PyTorch's clamp.
inline void masked_clamp_f32(const float* x, float* y, uint8_t* bits, int64_t bytes, bool bounded,
                             float upper) {
  const v4 zero = v4_zero(), hi = v4_set1(upper);
  for (int64_t b = 0; b < bytes; ++b) {
    const v4 a = v4_load(x + 8 * b), c = v4_load(x + 8 * b + 4);
    v4 ya = v4_max(zero, a), yc = v4_max(zero, c);
    v4 pa = v4_gt(a, zero), pc = v4_gt(c, zero);
    if (bounded) {
      ya = v4_min(hi, ya);
      yc = v4_min(hi, yc);
      pa = v4_and(pa, v4_lt(a, hi));
      pc = v4_and(pc, v4_lt(c, hi));
    }
    v4_store(y + 8 * b, ya);
    v4_store(y + 8 * b + 4, yc);
    bits[b] = static_cast<uint8_t>(v4_movemask(pa) | (v4_movemask(pc) << 4));
  }
}
#endif

template <typename scalar_t>
void masked_clamp_kernel(const scalar_t* x, scalar_t* y, uint8_t* bits, int64_t n, double upper) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool bounded = std::isfinite(upper);  // ReLU passes upper = inf: mask is x > 0 alone
  const acc_t hi = bounded ? static_cast<acc_t>(upper) : std::numeric_limits<acc_t>::infinity();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrainElements / kBlock), [&](int64_t b0, int64_t b1) {
    uint8_t m[kBlock];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t e0 = blk * kBlock, len = std::min<int64_t>(kBlock, n - e0);
#if defined(GF_V4)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (len == kBlock && simd()) {
          masked_clamp_f32(x + e0, y + e0, bits + e0 / 8, kBlock / 8, bounded, float(hi));
          continue;
        }
      }
#endif
      // vectorisable: clamp (NaN kept: both comparisons are false) and the 0/1 mask bytes
      const scalar_t* __restrict__ xb = x + e0;
      scalar_t* __restrict__ yb = y + e0;
      uint8_t* __restrict__ mb = m;
      for (int64_t k = 0; k < len; ++k) {
        const acc_t v = acc_t(xb[k]);
        const acc_t lo = v < acc_t(0) ? acc_t(0) : v;
        yb[k] = scalar_t(hi < lo ? hi : lo);
        mb[k] = static_cast<uint8_t>((v > acc_t(0)) & (bounded ? (v < hi) : true));
      }
      for (int64_t k = len; k < ((len + 7) / 8) * 8; ++k) m[k] = 0;
      for (int64_t k = 0; k < len; k += 8) bits[(e0 + k) / 8] = pack8(m + k);
    }
  });
}

template <typename scalar_t>
void mask_apply_kernel(const scalar_t* g, const uint8_t* bits, scalar_t* out, int64_t n) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrainElements / kBlock), [&](int64_t b0, int64_t b1) {
    uint8_t m[kBlock];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t e0 = blk * kBlock, len = std::min<int64_t>(kBlock, n - e0);
      for (int64_t k = 0; k < len; k += 8) unpack8(bits[(e0 + k) / 8], m + k);
      // select by AND-ing the value's bits with 0 or all ones: exact (+0.0 where masked), and
      // no branch to mispredict on a random mask
      using bits_t = std::conditional_t<sizeof(scalar_t) == 8, alias_u64,
                     std::conditional_t<sizeof(scalar_t) == 4, alias_u32, alias_u16>>;
      static_assert(sizeof(bits_t) == sizeof(scalar_t), "unsupported element size");
      const bits_t* __restrict__ gi = reinterpret_cast<const bits_t*>(g + e0);
      bits_t* __restrict__ oi = reinterpret_cast<bits_t*>(out + e0);
      for (int64_t k = 0; k < len; ++k)
        oi[k] = gi[k] & (static_cast<bits_t>(0) - static_cast<bits_t>(m[k] != 0));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> masked_clamp(const at::Tensor& x, double upper) {
  TORCH_CHECK(upper > 0, "gradfilter native masked_clamp: upper bound must be > 0, got ", upper);
  // any dense layout (channels-last included) is processed in memory order; y keeps the layout
  const at::Tensor src = x.is_non_overlapping_and_dense() ? x : x.contiguous();
  at::Tensor y = at::empty_like(src);
  at::Tensor bits = at::empty({(src.numel() + 7) / 8}, src.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "gf_masked_clamp", [&] {
    masked_clamp_kernel<scalar_t>(src.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                  bits.mutable_data_ptr<uint8_t>(), src.numel(), upper);
  });
  return {y, bits};
}

at::Tensor mask_apply(const at::Tensor& g, const at::Tensor& bits) {
  TORCH_CHECK(bits.scalar_type() == at::kByte && bits.dim() == 1,
              "gradfilter native mask_apply: bits must be a 1-D uint8 tensor");
  TORCH_CHECK(bits.numel() == (g.numel() + 7) / 8, "gradfilter native mask_apply: ", bits.numel(),
              " mask bytes for ", g.numel(), " gradient elements");
  // memory order, as masked_clamp: the caller passes g in the layout the mask was taken in
  const at::Tensor src = g.is_non_overlapping_and_dense() ? g : g.contiguous();
  const at::Tensor packed = bits.contiguous();
  at::Tensor out = at::empty_like(src);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "gf_mask_apply", [&] {
    mask_apply_kernel<scalar_t>(src.const_data_ptr<scalar_t>(), packed.const_data_ptr<uint8_t>(),
                                out.mutable_data_ptr<scalar_t>(), src.numel());
  });
  return out;
}


// ---------------------------------------------------------------------------------------------
// Eval-mode BatchNorm and activation of a fused block (src/gradfilter/blocks/), in one pass,
// with the patch statistics its patch-resolution backward needs:
//   v = z * scale[c] + shift[c];  y = clamp(v, 0, upper) (upper NaN: no activation, y = v);
//   m = 0 < v < upper (all ones without activation);
//   per patch, channel-major (C, N, Ph, Pw): count of m, sum of m * z, sum of y.
// Planes go 8 channels of one sample at a time: first the elementwise part over each whole
// plane (vectorised; y, and y, m * z, m into a small buffer), then the patch sums of the buffer,
// as patch_sum_kernel does (tiny planes: 8 planes' sums at once over each patch's pixel list).
// With AVX2 no plane buffers: tiny planes up to 16 wide row by row, 8 planes at once
// (bn_act_rows_avx2); other planes row by row into row accumulators (bn_act_plane_rows_avx2).

// One pixel of eval BatchNorm + activation: the output and the mask's (m * z, m), as the
// vector paths compute them (the scalar tails of every path).
template <typename acc_t>
inline void bn_act_pixel(acc_t zv, acc_t s, acc_t t, bool act, acc_t hi, acc_t& out, acc_t& mz,
                         acc_t& m1) {
  const acc_t v = zv * s + t;
  out = v;
  bool m = true;
  if (act) {
    const acc_t lo = v < acc_t(0) ? acc_t(0) : v;
    out = hi < lo ? hi : lo;
    m = (v > acc_t(0)) & (v < hi);
  }
  mz = m ? zv : acc_t(0);
  m1 = m ? acc_t(1) : acc_t(0);
}

// y, and the buffer's three planes (y, m * z, m), of one plane. Branch-free: the mask is random.
template <typename scalar_t, typename acc_t>
inline void bn_act_plane(const scalar_t* __restrict__ z, scalar_t* __restrict__ y,
                         acc_t* __restrict__ ty, acc_t* __restrict__ tmz, acc_t* __restrict__ tm,
                         int64_t n, acc_t s, acc_t t, bool act, acc_t hi) {
  int64_t e = 0;
#if defined(GF_V4)
  if constexpr (std::is_same_v<scalar_t, float>) {
    const v4 vs = v4_set1(s), vt = v4_set1(t), zero = v4_zero();
    const v4 vhi = v4_set1(hi), one = v4_set1(1.0f);
    const v4 all = v4_all();
    for (; simd() && e + 4 <= n; e += 4) {
      const v4 zv = v4_load(z + e);
      const v4 v = v4_add(v4_mul(zv, vs), vt);
      v4 out = v, m = all;
      if (act) {  // v4_max/v4_min return the second operand on NaN: NaN stays NaN, as clamp
        out = v4_min(vhi, v4_max(zero, v));
        m = v4_and(v4_gt(v, zero), v4_lt(v, vhi));
      }
      if (y != nullptr) v4_store(y + e, out);
      v4_store(ty + e, out);
      v4_store(tmz + e, v4_and(m, zv));
      v4_store(tm + e, v4_and(m, one));
    }
  }
#endif
  for (; e < n; ++e) {
    acc_t out, mz, m1;
    bn_act_pixel<acc_t>(acc_t(z[e]), s, t, act, hi, out, mz, m1);
    if (y != nullptr) y[e] = scalar_t(out);
    ty[e] = out;
    tmz[e] = mz;
    tm[e] = m1;
  }
}

#if defined(GF_V4)
// Tiny float planes, a full block of 8: first 4 planes × 4 pixels at a time (y stored, and y,
// m * z, m transposed 4×4 into pixel-major buffers pm[quantity][pixel][8 planes]), then each
// patch's pixel list summed with the 8 planes in two vectors per quantity. sums: [P][3][8].
inline void bn_act_tiny_block_f32(const float* const* zp, float* const* yp, const float* s8,
                                  const float* t8,
                                  int64_t HW, bool act, float hi, float* pm,
                                  const int64_t* pixels, const int64_t* first, int64_t P,
                                  float* sums) {
  float* pmy = pm;
  float* pmz = pm + HW * 8;
  float* pmm = pm + 2 * HW * 8;
  const v4 zero = v4_zero(), vhi = v4_set1(hi), one = v4_set1(1.0f);
  const v4 all = v4_all();
  for (int64_t g = 0; g < 2; ++g) {
    const float* const* zg = zp + g * 4;
    float* const* yg = yp + g * 4;
    v4 S[4], T[4];
    for (int j = 0; j < 4; ++j) {
      S[j] = v4_set1(s8[g * 4 + j]);
      T[j] = v4_set1(t8[g * 4 + j]);
    }
    int64_t e = 0;
    for (; e + 4 <= HW; e += 4) {
      v4 o[4], mz[4], mm[4];
      for (int j = 0; j < 4; ++j) {
        const v4 zv = v4_load(zg[j] + e);
        const v4 v = v4_add(v4_mul(zv, S[j]), T[j]);
        v4 out = v, m = all;
        if (act) {  // v4_max/v4_min return the second operand on NaN: NaN stays NaN, as clamp
          out = v4_min(vhi, v4_max(zero, v));
          m = v4_and(v4_gt(v, zero), v4_lt(v, vhi));
        }
        if (yg[j] != nullptr) v4_store(yg[j] + e, out);
        o[j] = out;
        mz[j] = v4_and(m, zv);
        mm[j] = v4_and(m, one);
      }
      v4_transpose(o[0], o[1], o[2], o[3]);
      v4_transpose(mz[0], mz[1], mz[2], mz[3]);
      v4_transpose(mm[0], mm[1], mm[2], mm[3]);
      for (int k = 0; k < 4; ++k) {
        v4_store(pmy + (e + k) * 8 + g * 4, o[k]);
        v4_store(pmz + (e + k) * 8 + g * 4, mz[k]);
        v4_store(pmm + (e + k) * 8 + g * 4, mm[k]);
      }
    }
    for (; e < HW; ++e)
      for (int j = 0; j < 4; ++j) {
        const int64_t o = e * 8 + g * 4 + j;
        bn_act_pixel<float>(zg[j][e], s8[g * 4 + j], t8[g * 4 + j], act, hi, pmy[o], pmz[o],
                            pmm[o]);
        if (yg[j] != nullptr) yg[j][e] = pmy[o];
      }
  }
  for (int64_t q = 0; q < P; ++q) {
    v4 y0 = zero, y1 = zero, z0 = zero, z1 = zero, m0 = zero, m1 = zero;
    for (int64_t i = first[q]; i < first[q + 1]; ++i) {
      const int64_t o = pixels[i] * 8;
      y0 = v4_add(y0, v4_load(pmy + o));
      y1 = v4_add(y1, v4_load(pmy + o + 4));
      z0 = v4_add(z0, v4_load(pmz + o));
      z1 = v4_add(z1, v4_load(pmz + o + 4));
      m0 = v4_add(m0, v4_load(pmm + o));
      m1 = v4_add(m1, v4_load(pmm + o + 4));
    }
    float* d = sums + q * 24;
    v4_store(d, m0);
    v4_store(d + 4, m1);
    v4_store(d + 8, z0);
    v4_store(d + 12, z1);
    v4_store(d + 16, y0);
    v4_store(d + 20, y1);
  }
}
#endif

#if defined(GF_HAVE_AVX2_TARGET)
// AVX2 paths, checked at run time (the build itself targets baseline x86-64). An 8×8 transpose:
__attribute__((target("avx2"))) inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// One vector of eval BatchNorm + activation: the output, and the pass mask in m (all ones
// without activation). vmaxps/vminps return the second operand on NaN: NaN stays NaN, as clamp.
__attribute__((target("avx2"))) inline __m256 bn_act_vec(__m256 zv, __m256 S, __m256 T, bool act,
                                                         __m256 vhi, __m256& m) {
  const __m256 zero = _mm256_setzero_ps(), x = _mm256_add_ps(_mm256_mul_ps(zv, S), T);
  m = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  if (!act) return x;
  m = _mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_GT_OQ), _mm256_cmp_ps(x, vhi, _CMP_LT_OQ));
  return _mm256_min_ps(vhi, _mm256_max_ps(zero, x));
}

// A whole vector, or its lanes in mk where the row ends inside it.
__attribute__((target("avx2"))) inline __m256 load_part(const float* p, bool whole, __m256i mk) {
  return whole ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mk);
}

__attribute__((target("avx2"))) inline void store_part(float* p, bool whole, __m256i mk,
                                                       __m256 v) {
  if (whole)
    _mm256_storeu_ps(p, v);
  else
    _mm256_maskstore_ps(p, mk, v);
}

// One map row of bn_act_rows_avx2 (NV vectors from zr; MASKED: the plane's last rows, whose
// vectors would leave it, loaded and stored in the lanes before `room`): y stored, and with SUM
// its (m, m * z, y) added to the accumulators (the all-ones mask is -1 as an integer).
template <int NV, bool ACT, bool SUM, bool MASKED, bool STORE>
__attribute__((target("avx2"))) inline void bn_act_row_avx2(
    const float* zr, float* yr, __m256 S, __m256 T, __m256 vhi, int64_t room, __m256i* am,
    __m256* az, __m256* ay) {
  const __m256 zero = _mm256_setzero_ps();
  for (int v = 0; v < NV; ++v) {
    __m256i mk = _mm256_setzero_si256();
    bool whole = true;
    if constexpr (MASKED) {
      whole = room >= 8 * (v + 1);
      if (!whole)
        mk = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(room - 8 * v)),
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    const __m256 zv = MASKED ? load_part(zr + 8 * v, whole, mk) : _mm256_loadu_ps(zr + 8 * v);
    const __m256 x = _mm256_add_ps(_mm256_mul_ps(zv, S), T);
    __m256 out = x;
    if constexpr (ACT) out = _mm256_min_ps(vhi, _mm256_max_ps(zero, x));
    if constexpr (STORE && MASKED)
      store_part(yr + 8 * v, whole, mk, out);
    else if constexpr (STORE)
      _mm256_storeu_ps(yr + 8 * v, out);
    if constexpr (SUM) {
      if constexpr (ACT) {
        const __m256 m = _mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_GT_OQ),
                                       _mm256_cmp_ps(x, vhi, _CMP_LT_OQ));
        am[v] = _mm256_sub_epi32(am[v], _mm256_castps_si256(m));
        az[v] = _mm256_add_ps(az[v], _mm256_and_ps(m, zv));
      } else {
        am[v] = _mm256_sub_epi32(am[v], _mm256_set1_epi32(-1));
        az[v] = _mm256_add_ps(az[v], zv);
      }
      ay[v] = _mm256_add_ps(ay[v], out);
    }
  }
}

// Rows [h0, h1) of one plane (SUM: one patch row's, summed into am / az / ay; STORE: y written).
template <int NV, bool ACT, bool SUM, bool STORE>
__attribute__((target("avx2"))) inline void bn_act_rows_range_avx2(
    const float* zj, float* yj, int64_t h0, int64_t h1, int64_t H, int64_t W, int64_t plain,
    __m256 S, __m256 T, __m256 vhi, __m256i* am, __m256* az, __m256* ay) {
  int64_t h = h0;
  for (const int64_t e = std::min(h1, plain); h < e; ++h)
    bn_act_row_avx2<NV, ACT, SUM, false, STORE>(zj + h * W, yj + h * W, S, T, vhi, 0, am, az,
                                                ay);
  for (; h < h1; ++h)
    bn_act_row_avx2<NV, ACT, SUM, true, STORE>(zj + h * W, yj + h * W, S, T, vhi, (H - h) * W,
                                               am, az, ay);
}

// Narrow tiny float planes (width ≤ 8·NV), a full block of 8, AVX2: no per-pixel transposes.
// Each row is NV vectors read straight from the plane: lanes past the row's end read the next
// row (never summed; their y is overwritten when that row is stored). Where whole vectors
// would leave the plane (its last rows), they run on into the next plane when it follows in
// memory and is done after this one (its first pixels are read but not summed, and the y
// written there is overwritten when that plane is stored); otherwise those rows are loaded and
// stored masked (slow stores on AMD cores). Each patch row's (m, m * z, y) sums go to rb.
// After the 8 planes, 8×8 transposes of rb put the planes in the lanes, so each patch's column
// segment adds up 8 planes at once. rows: each patch row's map rows; rb: [Ph][3][NV][8][8]
// floats; sums: [P][3][8]. Without STORE nothing is written to the planes (yp must then equal
// zp: the spill test compares them).
template <int NV, bool ACT, bool STORE>
__attribute__((target("avx2"))) void bn_act_rows_avx2(
    const float* const* zp, float* const* yp, const float* s8, const float* t8, int64_t H,
    int64_t W, float hi, const std::pair<int64_t, int64_t>* rows,
    const std::pair<int64_t, int64_t>* cols, int64_t Ph, int64_t Pw, float* rb, float* sums) {
  constexpr int64_t Q = 3 * NV * 64;  // rb floats per patch row
  const __m256 vhi = _mm256_set1_ps(hi);
  // rows off the grid (above the first patch row, below the last): y only
  const int64_t top_end = Ph ? rows[0].first : H, bottom = Ph ? rows[Ph - 1].second : H;
  // rows from which whole vectors stay in the plane: h + 1 < H - (8·NV - W) / W roughly
  int64_t inside = H;
  while (inside > 0 && (H - (inside - 1)) * W < 8 * NV) --inside;
  for (int64_t j = 0; j < 8; ++j) {
    const float* zj = zp[j];
    float* yj = yp[j];
    const __m256 S = _mm256_set1_ps(s8[j]), T = _mm256_set1_ps(t8[j]);
    // the spill of the last row stays within the planes after this one in the block
    const bool spill = j < 7 && 8 * NV - W <= (7 - j) * H * W &&
                       zp[7] == zj + (7 - j) * H * W && yp[7] == yj + (7 - j) * H * W;
    const int64_t plain = spill ? H : inside;
    __m256i am[NV];
    __m256 az[NV], ay[NV];
    bn_act_rows_range_avx2<NV, ACT, false, STORE>(zj, yj, 0, top_end, H, W, plain, S, T, vhi,
                                                  am, az, ay);
    for (int64_t i = 0; i < Ph; ++i) {
      for (int v = 0; v < NV; ++v) {
        am[v] = _mm256_setzero_si256();
        az[v] = ay[v] = _mm256_setzero_ps();
      }
      bn_act_rows_range_avx2<NV, ACT, true, STORE>(zj, yj, rows[i].first, rows[i].second, H, W,
                                                   plain, S, T, vhi, am, az, ay);
      for (int v = 0; v < NV; ++v) {
        float* d = rb + i * Q + v * 64 + j * 8;
        _mm256_storeu_ps(d, _mm256_cvtepi32_ps(am[v]));
        _mm256_storeu_ps(d + NV * 64, az[v]);
        _mm256_storeu_ps(d + 2 * NV * 64, ay[v]);
      }
    }
    bn_act_rows_range_avx2<NV, ACT, false, STORE>(zj, yj, std::max(bottom, top_end), H, H, W,
                                                  plain, S, T, vhi, am, az, ay);
  }
  alignas(32) float cb[3][8 * NV][8];  // per quantity and column: the 8 planes' patch-row sums
  for (int64_t i = 0; i < Ph; ++i) {
    for (int q = 0; q < 3; ++q)
      for (int v = 0; v < NV; ++v) {
        __m256 r[8];
        const float* src = rb + i * Q + (q * NV + v) * 64;
        for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(src + j * 8);
        transpose8(r);
        for (int k = 0; k < 8; ++k) _mm256_store_ps(cb[q][8 * v + k], r[k]);
      }
    for (int64_t c = 0; c < Pw; ++c) {
      float* d = sums + (i * Pw + c) * 24;
      for (int q = 0; q < 3; ++q) {
        __m256 s = _mm256_setzero_ps();
        for (int64_t w = cols[c].first; w < cols[c].second; ++w)
          s = _mm256_add_ps(s, _mm256_load_ps(cb[q][w]));
        _mm256_storeu_ps(d + 8 * q, s);
      }
    }
  }
}

// The 8 planes' patch sums (sums: [P][3][8], patch, quantity, plane) to the channel-major
// outputs (plane j's patch q at o0 + j * step + q): 8×8 transposes turn 8 patches × 8 planes
// into one run of patches per plane, stored as vectors (the counts packed to bytes with
// count_u8; they are small exact integers).
__attribute__((target("avx2"))) void store_sums_avx2(const float* sums, int64_t P, int64_t o0,
                                                     int64_t step, void* count_out, bool count_u8,
                                                     float* mz_sum, float* y_sum) {
  for (int64_t q0 = 0; q0 < P; q0 += 8) {
    const int64_t len = std::min<int64_t>(8, P - q0);
    for (int k = 0; k < 3; ++k) {
      __m256 r[8];
      for (int t = 0; t < 8; ++t)
        r[t] = t < len ? _mm256_loadu_ps(sums + (q0 + t) * 24 + 8 * k) : _mm256_setzero_ps();
      transpose8(r);  // r[j]: patches q0 .. q0 + len of plane j
      for (int j = 0; j < 8; ++j) {
        const int64_t o = o0 + j * step + q0;
        if (k == 0 && count_u8) {
          const __m256i iv = _mm256_cvtps_epi32(r[j]);
          const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(iv),
                                              _mm256_extracti128_si256(iv, 1));
          const __m128i b8 = _mm_packus_epi16(w16, w16);
          uint8_t* dst = static_cast<uint8_t*>(count_out) + o;
          if (len == 8) {
            _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), b8);
          } else {
            alignas(16) uint8_t tmp[16];
            _mm_store_si128(reinterpret_cast<__m128i*>(tmp), b8);
            std::memcpy(dst, tmp, static_cast<size_t>(len));
          }
          continue;
        }
        float* dst = (k == 0 ? static_cast<float*>(count_out) : k == 1 ? mz_sum : y_sum) + o;
        if (len == 8) {
          _mm256_storeu_ps(dst, r[j]);
        } else if (len == 4) {
          _mm_storeu_ps(dst, _mm256_castps256_ps128(r[j]));
        } else {
          alignas(32) float tmp[8];
          _mm256_store_ps(tmp, r[j]);
          std::memcpy(dst, tmp, static_cast<size_t>(len) * sizeof(float));
        }
      }
    }
  }
}

// One float plane of any width, AVX2, row by row (planes that are not tiny): each row's y is
// stored (unless y is null) and its (m, m * z, y) added into three row accumulators of its
// patch row (acc: 3 × W rounded up to 8 floats, in L1; a row's last partial vector is loaded
// and stored masked, its spare lanes land in the accumulators' padding); when the patch row
// ends, the accumulators' column segments give its patches' sums. sums: [P][3] (count, m * z,
// y); patches without map pixels: 0.
__attribute__((target("avx2"))) void bn_act_plane_rows_avx2(
    const float* z, float* y, float s, float t, int64_t H, int64_t W, bool act, float hi,
    const int64_t* row_patch, const std::pair<int64_t, int64_t>* cols, int64_t Ph, int64_t Pw,
    float* acc, float* sums) {
  std::fill(sums, sums + 3 * Ph * Pw, 0.0f);
  const int64_t W8 = (W + 7) / 8 * 8;
  float* am = acc;
  float* az = acc + W8;
  float* ay = acc + 2 * W8;
  const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(W % 8)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 vhi = _mm256_set1_ps(hi), one = _mm256_set1_ps(1.0f);
  const __m256 S = _mm256_set1_ps(s), T = _mm256_set1_ps(t);
  int64_t cur = -1;
  for (int64_t h = 0; h <= H; ++h) {
    const int64_t i = h < H ? row_patch[h] : -1;
    if (i != cur) {
      if (cur >= 0)  // the patch row ends: its patches' sums
        for (int64_t q = 0; q < Pw; ++q) {
          float* d = sums + 3 * (cur * Pw + q);
          for (int64_t w = cols[q].first; w < cols[q].second; ++w) {
            d[0] += am[w];
            d[1] += az[w];
            d[2] += ay[w];
          }
        }
      if (i >= 0) std::fill(acc, acc + 3 * W8, 0.0f);
      cur = i;
    }
    if (h == H) break;
    const float* zr = z + h * W;
    float* yr = y != nullptr ? y + h * W : nullptr;
    for (int64_t w = 0; w < W; w += 8) {
      const bool whole = w + 8 <= W;
      const __m256 zv = load_part(zr + w, whole, tail);
      __m256 m;
      const __m256 out = bn_act_vec(zv, S, T, act, vhi, m);
      if (yr != nullptr) store_part(yr + w, whole, tail, out);
      if (i >= 0) {
        _mm256_storeu_ps(am + w, _mm256_add_ps(_mm256_loadu_ps(am + w), _mm256_and_ps(m, one)));
        _mm256_storeu_ps(az + w, _mm256_add_ps(_mm256_loadu_ps(az + w), _mm256_and_ps(m, zv)));
        _mm256_storeu_ps(ay + w, _mm256_add_ps(_mm256_loadu_ps(ay + w), out));
      }
    }
  }
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has && wide_simd();
}
#endif

// A stride-1 depthwise conv whose output z the stats pass computes itself, 8 planes at a time
// into a per-thread buffer (a fused block's depthwise unit on a tiny map): z is never written to
// memory and read back, and the conv takes no oneDNN call with its layout reorders. Input
// (N, C, Hin, Win) contiguous float, weight (C, k·k), bias (C) or null, zero padding pt / pl
// above / left of the input (the bottom / right padding follows from the output size).
struct DwSource {
  const float* x;
  const float* w;
  const float* bias;
  int64_t Hin, Win, k, pt, pl;
};

#if defined(GF_HAVE_AVX2_TARGET)
// One plane of a DwSource into its padded copy: pad holds dw_pad_rows(H, k) rows of S floats,
// zero outside the input's rectangle (rows pt .., columns pl ..), which this call fills; S >=
// round_up(W + k - 1, 8) + 8 so that every 8-wide load stays inside the row. Each input row in
// 8-wide pieces: masked loads (zeros past the row), whole stores (the zeros land on the right
// padding). All 8 planes are copied before any is convolved: a load that straddles a store
// still in flight waits for it (store-to-load forwarding fails on partial overlap), which took
// the convolution from ~40 to ~100 cycles a plane.
__attribute__((target("avx2"))) void dw_pad_plane_avx2(const DwSource& d, const float* xin,
                                                      int64_t H, int64_t W, float* pad,
                                                      int64_t S) {
  const int64_t rows = std::min(d.Hin, H + d.k - 1 - d.pt);
  const int64_t cols = std::min(d.Win, W + d.k - 1 - d.pl);  // the columns any output reads
  for (int64_t c0 = 0; c0 < cols; c0 += 8) {
    const __m256i mk = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cols - c0)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int64_t r = 0; r < rows; ++r)
      _mm256_storeu_ps(pad + (d.pt + r) * S + d.pl + c0,
                       _mm256_maskload_ps(xin + r * d.Win + c0, mk));
  }
}

// One plane's depthwise conv from its padded copy (dw_pad_plane_avx2) into z (H × W, row-major;
// up to 7 floats past its end are written and must be room the caller owns). Eight output rows
// at a time, one accumulator each: eight independent FMA chains per tap.
__attribute__((target("avx2,fma"))) void dw_plane_avx2(const float* pad, int64_t S, int64_t k,
                                                       const float* w, float bias, int64_t H,
                                                       int64_t W, float* z) {
  const int64_t NV = (W + 7) / 8;
  const __m256 vb = _mm256_set1_ps(bias);
  // the last vector first: its lanes past the row land on the next row's start, which the
  // next row's store (one vector) or the first vector's (several) then rewrites
  for (int64_t v = NV - 1; v >= 0; --v)
    for (int64_t oh0 = 0; oh0 < H; oh0 += 8) {
      __m256 a0 = vb, a1 = vb, a2 = vb, a3 = vb, a4 = vb, a5 = vb, a6 = vb, a7 = vb;
      for (int64_t i = 0; i < k; ++i) {
        const float* base = pad + (oh0 + i) * S + 8 * v;
        for (int64_t j = 0; j < k; ++j) {
          const __m256 wv = _mm256_broadcast_ss(w + i * k + j);
          const float* q = base + j;
          a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q), wv, a0);
          a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + S), wv, a1);
          a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 2 * S), wv, a2);
          a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 3 * S), wv, a3);
          a4 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 4 * S), wv, a4);
          a5 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 5 * S), wv, a5);
          a6 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 6 * S), wv, a6);
          a7 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 7 * S), wv, a7);
        }
      }
      // rows past the plane are not stored
      const __m256 acc[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
      for (int64_t r = 0; r < 8 && oh0 + r < H; ++r)
        _mm256_storeu_ps(z + (oh0 + r) * W + 8 * v, acc[r]);
    }
}
#endif

// Rows of dw_plane_avx2's padded input: its 8-row groups read k - 1 rows past the last group.
constexpr int64_t dw_pad_rows(int64_t H, int64_t k) { return (H + 7) / 8 * 8 + k - 1; }

// y null: the statistics only, nothing written to a map. dw (float, AVX2 only): z is null and
// each item computes its planes' z from dw first.
template <typename scalar_t>
void bn_act_stats_kernel(const scalar_t* z, const scalar_t* scale, const scalar_t* shift,
                         scalar_t* y, void* count_out, bool count_u8, scalar_t* mz_sum,
                         scalar_t* y_sum,
                         int64_t N, int64_t C, int64_t H, int64_t W, int64_t k, int64_t top,
                         int64_t left, int64_t Ph, int64_t Pw, double upper,
                         const DwSource* dw = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool act = !std::isnan(upper);
  const acc_t hi = act ? static_cast<acc_t>(upper) : std::numeric_limits<acc_t>::infinity();
  const int64_t HW = H * W, P = Ph * Pw;
  const auto rows = segments(H, k, top, Ph), cols = segments(W, k, left, Pw);
  // counts are small integers (at most k·k): one byte each when the caller asks
  auto put_count = [count_out, count_u8](int64_t o, acc_t v) {
    if (count_u8)
      static_cast<uint8_t*>(count_out)[o] = static_cast<uint8_t>(v);
    else
      static_cast<scalar_t*>(count_out)[o] = scalar_t(v);
  };
  const bool tiny = tiny_planes(H, W, Ph, Pw);
  const auto row_patch = position_patch(H, k, top, Ph);
  std::vector<int64_t> pixels, first(P + 1, 0);  // tiny planes: each patch's pixel list
  if (tiny)
    for (int64_t i = 0; i < Ph; ++i)
      for (int64_t j = 0; j < Pw; ++j) {
        for (int64_t h = rows[i].first; h < rows[i].second; ++h)
          for (int64_t w = cols[j].first; w < cols[j].second; ++w) pixels.push_back(h * W + w);
        first[i * Pw + j + 1] = static_cast<int64_t>(pixels.size());
      }
  // Work items: 8 consecutive channels of one sample. The batch is cut into one run of samples
  // per thread, as oneDNN's conv splits the map it writes: a thread reads the z its own core
  // just wrote (channel-major items read half of z from the other core's cache, 2-3x slower in
  // a block right after the conv). Within a run, items go channel group by channel group, so
  // each channel's sums are written in one sequential run (sample-major items wrote each
  // plane's sums to its own cache line, a write-allocate miss apiece).
  // float planes, AVX2: up to 16 pixels wide and tiny, bn_act_rows_avx2 (8 planes at once);
  // otherwise bn_act_plane_rows_avx2 (one plane at a time, no plane buffers)
  bool wide_rows = false;
#if defined(GF_HAVE_AVX2_TARGET)
  wide_rows = std::is_same_v<scalar_t, float> && (!tiny || W > 16) && cpu_has_avx2();
#endif
  constexpr int64_t B = kTinyPlanes;
  const int64_t groups = (C + B - 1) / B;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N));
  const int64_t nchunk = (N + threads - 1) / threads, blocks = groups * nchunk * ((N + nchunk - 1) / nchunk);
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrainElements / (B * HW)), [&](int64_t b0, int64_t b1) {
    // the narrow-plane path keeps its patch-row sums (Ph × 384 floats) where the planes' go
    const int64_t planes_buf = wide_rows ? 0 : std::max<int64_t>(3 * B * HW, Ph * 384);
    std::vector<acc_t> buf(planes_buf + 3 * W + 24 + 3 * B * P);
    // dw: the 8 planes' z (+ 8 floats of room for the last row's stores) and the padded input
    const int64_t dw_stride = dw ? (W + dw->k - 1 + 7) / 8 * 8 + 8 : 0;
    const int64_t dw_pad = dw ? dw_pad_rows(H, dw->k) * dw_stride : 0;  // floats per plane
    std::vector<float> dw_buf(dw ? B * HW + 8 + B * dw_pad : 0, 0.0f);
    acc_t* ty = buf.data();        // [B][HW]
    acc_t* tmz = ty + B * HW;      // [B][HW]
    acc_t* tm = tmz + B * HW;      // [B][HW]
    acc_t* row = ty + planes_buf;  // 3 rows of W: y, m*z, m summed over a patch row
    const scalar_t* zp[B];
    scalar_t* yp[B];
    // item b: run b / per_run, then channel group, then sample within the run (decoded once,
    // then stepped: divisions per item cost 5% of the pass on 7×7 maps)
    const int64_t per_run = groups * nchunk;
    int64_t run = b0 / per_run, rem = b0 % per_run;
    int64_t nlen = std::min(nchunk, N - run * nchunk), gi = rem / nlen, ni = rem % nlen;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t cur_run = run, cur_g = gi, n = run * nchunk + ni;
      if (++ni == nlen) {
        ni = 0;
        ++gi;
      }
      if (++rem == per_run) {
        rem = gi = ni = 0;
        ++run;
        nlen = std::min(nchunk, N - run * nchunk);
      }
      if (cur_g >= groups) continue;  // the last run is short: its tail items are empty
      // odd runs walk the channel groups backwards: two threads then meet on a channel's line
      // of sums (shared where a run of samples' sums ends mid-line) once, not at every group
      const int64_t grp = cur_run % 2 ? groups - 1 - cur_g : cur_g;
      const int64_t c0 = grp * B, cnt = std::min(B, C - c0);
      for (int64_t j = 0; j < cnt; ++j) {
        yp[j] = y != nullptr ? y + (n * C + c0 + j) * HW : nullptr;
        zp[j] = dw ? nullptr : z + (n * C + c0 + j) * HW;
      }
#if defined(GF_HAVE_AVX2_TARGET)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (dw) {  // the planes' z into the buffer: every plane padded first, then convolved
          float* pads = dw_buf.data() + B * HW + 8;
          const int64_t in_hw = dw->Hin * dw->Win, kk = dw->k * dw->k;
          for (int64_t j = 0; j < cnt; ++j)
            dw_pad_plane_avx2(*dw, dw->x + (n * C + c0 + j) * in_hw, H, W, pads + j * dw_pad,
                              dw_stride);
          for (int64_t j = 0; j < cnt; ++j) {
            zp[j] = dw_buf.data() + j * HW;
            dw_plane_avx2(pads + j * dw_pad, dw_stride, dw->k, dw->w + (c0 + j) * kk,
                          dw->bias ? dw->bias[c0 + j] : 0.0f, H, W, dw_buf.data() + j * HW);
          }
        }
      }
#endif
      const int64_t o0 = (c0 * N + n) * P, step = N * P;  // plane j's sums: o0 + j * step
#if defined(GF_V4)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (tiny && cnt == B && !wide_rows && simd()) {
          float s8[B], t8[B];
          for (int64_t j = 0; j < B; ++j) {
            s8[j] = scale[c0 + j];
            t8[j] = shift[c0 + j];
          }
          float* sums = row + 3 * W;  // [P][3][B]
#if defined(GF_HAVE_AVX2_TARGET)
          if (cpu_has_avx2()) {
            const auto* rp = rows.data();
            const auto* cp = cols.data();
            float* const* yv = y != nullptr ? yp : const_cast<float* const*>(zp);
            // the template arguments (vectors per row, activation, y stored) from run-time ones
            auto run = [&](auto nv, auto a, auto store) {
              bn_act_rows_avx2<decltype(nv)::value, decltype(a)::value, decltype(store)::value>(
                  zp, yv, s8, t8, H, W, hi, rp, cp, Ph, Pw, ty, sums);
            };
            auto with_store = [&](auto nv, auto a) {
              if (y != nullptr) run(nv, a, std::true_type{});
              else run(nv, a, std::false_type{});
            };
            auto with_act = [&](auto nv) {
              if (act) with_store(nv, std::true_type{});
              else with_store(nv, std::false_type{});
            };
            if (W <= 8) with_act(std::integral_constant<int, 1>{});
            else with_act(std::integral_constant<int, 2>{});
            store_sums_avx2(sums, P, o0, step, count_out, count_u8, mz_sum, y_sum);
            continue;
          }
#endif
            bn_act_tiny_block_f32(zp, yp, s8, t8, HW, act, hi, ty, pixels.data(), first.data(),
                                  P, sums);
          for (int64_t j = 0; j < B; ++j)
            for (int64_t q = 0; q < P; ++q) {
              const int64_t o = o0 + j * step + q;
              put_count(o, sums[q * 24 + j]);
              mz_sum[o] = sums[q * 24 + 8 + j];
              y_sum[o] = sums[q * 24 + 16 + j];
            }
          continue;
        }
#if defined(GF_HAVE_AVX2_TARGET)
        if (wide_rows) {
          float* psums = row + 3 * W + 24;  // [P][3]
          for (int64_t j = 0; j < cnt; ++j) {
            bn_act_plane_rows_avx2(zp[j], yp[j], scale[c0 + j], shift[c0 + j], H, W, act, hi,
                                   row_patch.data(), cols.data(), Ph, Pw, row, psums);
            for (int64_t q = 0; q < P; ++q) {
              const int64_t o = o0 + j * step + q;
              put_count(o, psums[3 * q]);
              mz_sum[o] = psums[3 * q + 1];
              y_sum[o] = psums[3 * q + 2];
            }
          }
          continue;
        }
#endif
      }
#endif
      for (int64_t j = 0; j < cnt; ++j) {
        bn_act_plane<scalar_t, acc_t>(zp[j], yp[j], ty + j * HW, tmz + j * HW, tm + j * HW, HW,
                                      acc_t(scale[c0 + j]), acc_t(shift[c0 + j]), act, hi);
      }
      auto store = [&](int64_t j, int64_t q, acc_t sc, acc_t smz, acc_t sy) {
        const int64_t o = o0 + j * step + q;
        put_count(o, sc);
        mz_sum[o] = scalar_t(smz);
        y_sum[o] = scalar_t(sy);
      };
      if (tiny) {  // 4 planes at a time: 12 independent sums stay in registers
        constexpr int64_t Q = 4;
        for (int64_t j0 = 0; j0 < cnt; j0 += Q) {
          const acc_t* m0 = tm + j0 * HW;
          const acc_t* mz0 = tmz + j0 * HW;
          const acc_t* y0 = ty + j0 * HW;
          for (int64_t q = 0; q < P; ++q) {
            acc_t a0[Q] = {}, a1[Q] = {}, a2[Q] = {};
            for (int64_t e = first[q]; e < first[q + 1]; ++e) {
              const int64_t px = pixels[e];
              for (int64_t j = 0; j < Q; ++j) {
                a0[j] += m0[j * HW + px];
                a1[j] += mz0[j * HW + px];
                a2[j] += y0[j * HW + px];
              }
            }
            for (int64_t j = 0; j < std::min(Q, cnt - j0); ++j) store(j0 + j, q, a0[j], a1[j], a2[j]);
          }
        }
        continue;
      }
      for (int64_t j = 0; j < cnt; ++j)
        for (int64_t i = 0; i < Ph; ++i) {
          acc_t* __restrict__ r0 = row;
          acc_t* __restrict__ r1 = row + W;
          acc_t* __restrict__ r2 = row + 2 * W;
          std::fill(row, row + 3 * W, acc_t(0));
          for (int64_t h = rows[i].first; h < rows[i].second; ++h) {
            const acc_t* __restrict__ sm = tm + j * HW + h * W;
            const acc_t* __restrict__ smz = tmz + j * HW + h * W;
            const acc_t* __restrict__ sy = ty + j * HW + h * W;
            for (int64_t w = 0; w < W; ++w) {
              r0[w] += sm[w];
              r1[w] += smz[w];
              r2[w] += sy[w];
            }
          }
          for (int64_t q = 0; q < Pw; ++q)
            store(j, i * Pw + q, segment_sum(r0, cols[q]), segment_sum(r1, cols[q]),
                  segment_sum(r2, cols[q]));
        }
    }
  });
}

// The stats pass's argument checks and its outputs for an (N, C, H, W) map with `opt`'s dtype:
// y (where store, else undefined), the mask counts, Σ m·z and Σ y, each (C, N, ph, pw).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_outputs(
    int64_t N, int64_t C, int64_t H, int64_t W, const at::Tensor& scale, const at::Tensor& shift,
    double upper, int64_t k, int64_t ph, int64_t pw, bool count_u8, bool store,
    const at::TensorOptions& opt, const char* name) {
  TORCH_CHECK(!count_u8 || k * k <= 255,
              "gradfilter native ", name, ": byte counts need k*k <= 255, got k=", k);
  check_geometry(k, ph, "height");
  check_geometry(k, pw, "width");
  TORCH_CHECK(std::isnan(upper) || upper > 0,
              "gradfilter native ", name, ": upper bound must be > 0 or NaN, got ", upper);
  TORCH_CHECK(scale.numel() == C && shift.numel() == C,
              "gradfilter native ", name, ": scale and shift need ", C, " values");
  at::Tensor y = store ? at::empty({N, C, H, W}, opt) : at::Tensor();
  at::Tensor mz = at::empty({C, N, ph, pw}, opt), ys = at::empty_like(mz);
  at::Tensor count = count_u8 ? at::empty_like(mz, mz.options().dtype(at::kByte)) : at::empty_like(mz);
  return {y, count, mz, ys};
}

// The stats pass with its checks; store false: the statistics only (y is not written and is
// returned undefined).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_pass(
    const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift, double upper,
    int64_t k, int64_t top, int64_t left, int64_t ph, int64_t pw, bool count_u8, bool store,
    const char* name) {
  TORCH_CHECK(z.dim() == 4, "gradfilter native ", name, ": expected a 4-D map, got ", z.dim(), "-D");
  const int64_t N = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3);
  const at::Tensor src = z.contiguous();
  auto [y, count, mz, ys] = stats_outputs(N, C, H, W, scale, shift, upper, k, ph, pw, count_u8,
                                          store, src.options(), name);
  const at::Tensor sc = scale.to(z.scalar_type()).contiguous(), sh = shift.to(z.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "gf_bn_act_stats", [&] {
    bn_act_stats_kernel<scalar_t>(src.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(),
                                  sh.const_data_ptr<scalar_t>(),
                                  store ? y.mutable_data_ptr<scalar_t>() : nullptr,
                                  count.data_ptr(), count_u8, mz.mutable_data_ptr<scalar_t>(),
                                  ys.mutable_data_ptr<scalar_t>(), N, C, H, W, k, top, left, ph, pw,
                                  upper);
  });
  return {y, count, mz, ys};
}

std::atomic<int64_t> dw_in_stats_passes{0};  // depthwise units whose conv ran in the stats pass

int64_t fused_dw_passes() { return dw_in_stats_passes.load(); }

// Whether a fused unit's stride-1 conv can run inside its stats pass (DwSource): float32 on a
// CPU with AVX2 and FMA, contiguous input, depthwise with a square kernel, a tiny output map
// (H × W, which the caller derived for stride 1).
bool dw_in_stats(const at::Tensor& x, const at::Tensor& weight, int64_t groups, int64_t H,
                 int64_t W, int64_t ph, int64_t pw) {
#if defined(GF_HAVE_AVX2_TARGET)
  static const bool fma = __builtin_cpu_supports("fma");
  return fma && cpu_has_avx2() &&
         x.device().is_cpu() && x.scalar_type() == at::kFloat &&
         weight.scalar_type() == at::kFloat && x.dim() == 4 && x.is_contiguous() &&
         H >= 1 && W >= 1 && groups == x.size(1) && weight.dim() == 4 &&
         weight.size(0) == groups && weight.size(1) == 1 && weight.size(2) == weight.size(3) &&
         tiny_planes(H, W, ph, pw);
#else
  return false;
#endif
}

// stats_pass over the output of a depthwise conv of x (dw_in_stats holds), computed inside the
// pass: pt / pl zero rows / columns above / left of x, output H × W.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_stats_pass(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    int64_t pt, int64_t pl, int64_t H, int64_t W, const at::Tensor& scale,
    const at::Tensor& shift, double upper, int64_t k, int64_t top, int64_t left, int64_t ph,
    int64_t pw, bool count_u8, bool store) {
  const int64_t N = x.size(0), C = x.size(1), kw = weight.size(2);
  TORCH_CHECK(pt >= 0 && pl >= 0 && H + kw - 1 >= pt + 1 && W + kw - 1 >= pl + 1,
              "gradfilter native fused_block_forward: bad depthwise geometry");
  auto [y, count, mz, ys] = stats_outputs(N, C, H, W, scale, shift, upper, k, ph, pw, count_u8,
                                          store, x.options(), "fused_block_forward");
  const at::Tensor w = weight.detach().contiguous(), sc = scale.contiguous(), sh = shift.contiguous();
  at::Tensor b;
  if (bias.has_value()) b = bias->detach().to(at::kFloat).contiguous();
  const DwSource d{x.const_data_ptr<float>(), w.const_data_ptr<float>(),
                   b.defined() ? b.const_data_ptr<float>() : nullptr, x.size(2), x.size(3), kw,
                   pt, pl};
  bn_act_stats_kernel<float>(nullptr, sc.const_data_ptr<float>(), sh.const_data_ptr<float>(),
                             store ? y.mutable_data_ptr<float>() : nullptr, count.data_ptr(),
                             count_u8, mz.mutable_data_ptr<float>(), ys.mutable_data_ptr<float>(),
                             N, C, H, W, k, top, left, ph, pw, upper, &d);
  dw_in_stats_passes.fetch_add(1, std::memory_order_relaxed);
  return {y, count, mz, ys};
}

std::tuple<std::optional<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> bn_act_stats(
    const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift, double upper,
    int64_t k, int64_t top, int64_t left, int64_t ph, int64_t pw, bool count_u8, bool store) {
  auto [y, count, mz, ys] = stats_pass(z, scale, shift, upper, k, top, left, ph, pw, count_u8,
                                       store, "bn_act_stats");
  return {store ? std::optional<at::Tensor>(y) : std::nullopt, count, mz, ys};
}

// ---------------------------------------------------------------------------------------------
// The patch-resolution backward of one fused unit (conv → eval BatchNorm → activation), before
// its conv's products (src/gradfilter/blocks/reference.py, FusedBlock.backward). Per channel c and patch
// column j (N·P columns; g one value per patch, n_j the patch's real pixels):
//   γ's grad  Σ_j g·(Σm·z − μ·|m|) / σ         (only with a masked-z sum)
//   β's grad  Σ_j g·|m|;  the conv bias's grad  s · Σ_j g·|m|   (s = γ/σ)
//   ḡ         g·|m|·s / n_j · gscale            (the conv's filtered output gradient)
// One pass over the (C, N·P) maps where PyTorch ops take about ten.

#if defined(GF_HAVE_AVX2_TARGET)
// One channel of unit_backward_kernel for float maps with byte counts, AVX2: each count is
// widened once and serves both sums.
__attribute__((target("avx2"))) void unit_backward_row_avx2(
    const float* g, const uint8_t* count, const float* mz, const float* inv_n, float s, float mu,
    int64_t M, float* out, float& sum_gm, float& sum_gamma) {
  __m256 am = _mm256_setzero_ps(), az = _mm256_setzero_ps();
  const __m256 vs = _mm256_set1_ps(s), vmu = _mm256_set1_ps(mu);
  int64_t j = 0;
  for (; j + 8 <= M; j += 8) {
    const __m256 gv = _mm256_loadu_ps(g + j);
    const __m128i n8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(count + j));
    const __m256 nv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(n8));
    const __m256 gm = _mm256_mul_ps(gv, nv);
    am = _mm256_add_ps(am, gm);
    _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_mul_ps(gm, vs), _mm256_loadu_ps(inv_n + j)));
    if (mz != nullptr)
      az = _mm256_add_ps(az, _mm256_mul_ps(gv, _mm256_sub_ps(_mm256_loadu_ps(mz + j),
                                                             _mm256_mul_ps(vmu, nv))));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, am);
  float sm = 0.0f, sz = 0.0f;
  for (int k = 0; k < 8; ++k) sm += lanes[k];
  _mm256_store_ps(lanes, az);
  for (int k = 0; k < 8; ++k) sz += lanes[k];
  for (; j < M; ++j) {
    const float nv = float(count[j]), gm = g[j] * nv;
    sm += gm;
    out[j] = gm * s * inv_n[j];
    if (mz != nullptr) sz += g[j] * (mz[j] - mu * nv);
  }
  sum_gm = sm;
  sum_gamma = sz;
}
#endif

#if defined(GF_V4)
// unit_backward_kernel's whole blocks of 8 columns for one float channel, 4-lane vectors: its
// eight partial sums pm, pz as two vectors each, every lane in the portable loop's order (the
// same results, bit for bit). Returns the columns done.
template <typename count_t>
int64_t unit_backward_blocks_v4(const float* g, const count_t* count, const float* mz,
                                const float* inv_n, float s, float mu, int64_t M, float* out,
                                float* pm, float* pz) {
  const v4 vs = v4_set1(s), vmu = v4_set1(mu);
  v4 m0 = v4_zero(), m1 = m0, z0 = m0, z1 = m0;
  int64_t j = 0;
  for (; j + 8 <= M; j += 8) {
    v4 n0, n1;
    if constexpr (std::is_same_v<count_t, uint8_t>) {
      v4_bytes8(count + j, n0, n1);
    } else {
      n0 = v4_load(count + j);
      n1 = v4_load(count + j + 4);
    }
    const v4 g0 = v4_load(g + j), g1 = v4_load(g + j + 4);
    const v4 gm0 = v4_mul(g0, n0), gm1 = v4_mul(g1, n1);
    m0 = v4_add(m0, gm0);
    m1 = v4_add(m1, gm1);
    v4_store(out + j, v4_mul(v4_mul(gm0, vs), v4_load(inv_n + j)));
    v4_store(out + j + 4, v4_mul(v4_mul(gm1, vs), v4_load(inv_n + j + 4)));
    if (mz != nullptr) {
      z0 = v4_add(z0, v4_mul(g0, v4_sub(v4_load(mz + j), v4_mul(vmu, n0))));
      z1 = v4_add(z1, v4_mul(g1, v4_sub(v4_load(mz + j + 4), v4_mul(vmu, n1))));
    }
  }
  v4_store(pm, m0);
  v4_store(pm + 4, m1);
  v4_store(pz, z0);
  v4_store(pz + 4, z1);
  return j;
}
#endif

template <typename scalar_t, typename count_t>
void unit_backward_kernel(const scalar_t* g, const count_t* count, const scalar_t* mz,
                          const scalar_t* scale, const scalar_t* inv_std, const scalar_t* mean,
                          const scalar_t* per_pixel, double gscale, int64_t C, int64_t M,
                          scalar_t* gbar, scalar_t* ggamma, scalar_t* gbeta, scalar_t* gbias) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> inv_n(M);  // gscale / n_j
  for (int64_t j = 0; j < M; ++j) inv_n[j] = acc_t(gscale) / acc_t(per_pixel[j]);
  at::parallel_for(0, C, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(M, 1)),
                   [&](int64_t c0, int64_t c1) {
    constexpr int64_t L = 8;  // independent partial sums: the adds need not wait on each other
    for (int64_t c = c0; c < c1; ++c) {
#if defined(GF_HAVE_AVX2_TARGET)
      if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<count_t, uint8_t>) {
        if (cpu_has_avx2()) {
          float sum_gm, sum_gamma;
          unit_backward_row_avx2(g + c * M, count + c * M, mz ? mz + c * M : nullptr,
                                 inv_n.data(), scale[c], mean[c], M, gbar + c * M, sum_gm,
                                 sum_gamma);
          ggamma[c] = sum_gamma * inv_std[c];
          gbeta[c] = sum_gm;
          gbias[c] = sum_gm * scale[c];
          continue;
        }
      }
#endif
      const scalar_t* __restrict__ gc = g + c * M;
      const count_t* __restrict__ nc = count + c * M;
      scalar_t* __restrict__ out = gbar + c * M;
      const acc_t s = acc_t(scale[c]);
      acc_t pm[L] = {}, pz[L] = {};
      int64_t j = 0;
#if defined(GF_V4)
      if constexpr (std::is_same_v<scalar_t, float>) {
        // x86 at level 2 keeps its AVX2-or-scalar choice (its measured path); there the 4-lane
        // path, NEON's, runs at level 1 (use_simd(1)) to be tested
        if (simd() && (kNeon || !wide_simd()))
          j = unit_backward_blocks_v4(gc, nc, mz ? mz + c * M : nullptr, inv_n.data(), s,
                                      acc_t(mean[c]), M, out, pm, pz);
      }
#endif
      const int64_t done = j;  // whole blocks the vector path took
      for (; j + L <= M; j += L)
        for (int64_t k = 0; k < L; ++k) {
          const acc_t gm = acc_t(gc[j + k]) * acc_t(nc[j + k]);
          pm[k] += gm;
          out[j + k] = scalar_t(gm * s * inv_n[j + k]);
        }
      for (; j < M; ++j) {
        const acc_t gm = acc_t(gc[j]) * acc_t(nc[j]);
        pm[0] += gm;
        out[j] = scalar_t(gm * s * inv_n[j]);
      }
      if (mz != nullptr) {
        const scalar_t* __restrict__ zc = mz + c * M;
        const acc_t mu = acc_t(mean[c]);
        for (j = done; j + L <= M; j += L)
          for (int64_t k = 0; k < L; ++k)
            pz[k] += acc_t(gc[j + k]) * (acc_t(zc[j + k]) - mu * acc_t(nc[j + k]));
        for (; j < M; ++j) pz[0] += acc_t(gc[j]) * (acc_t(zc[j]) - mu * acc_t(nc[j]));
      }
      acc_t sum_gm = 0, sum_gamma = 0;
      for (int64_t k = 0; k < L; ++k) {
        sum_gm += pm[k];
        sum_gamma += pz[k];
      }
      ggamma[c] = scalar_t(sum_gamma * acc_t(inv_std[c]));
      gbeta[c] = scalar_t(sum_gm);
      gbias[c] = scalar_t(sum_gm * s);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> unit_backward(
    const at::Tensor& g, const at::Tensor& count, const std::optional<at::Tensor>& mz,
    const at::Tensor& scale, const at::Tensor& inv_std, const at::Tensor& mean,
    const at::Tensor& per_pixel, double gscale) {
  TORCH_CHECK(g.dim() == 2, "gradfilter native unit_backward: g must be (C, N*P), got ", g.dim(), "-D");
  const int64_t C = g.size(0), M = g.size(1);
  TORCH_CHECK(count.sizes() == g.sizes(), "gradfilter native unit_backward: count must match g");
  TORCH_CHECK(count.scalar_type() == at::kByte || count.scalar_type() == g.scalar_type(),
              "gradfilter native unit_backward: count must be uint8 or g's dtype");
  TORCH_CHECK(!mz.has_value() || mz->sizes() == g.sizes(),
              "gradfilter native unit_backward: mz must match g");
  TORCH_CHECK(scale.numel() == C && inv_std.numel() == C && mean.numel() == C,
              "gradfilter native unit_backward: scale, inv_std and mean need ", C, " values");
  TORCH_CHECK(per_pixel.numel() == M, "gradfilter native unit_backward: per_pixel needs ", M,
              " values");
  const auto dt = g.scalar_type();
  const at::Tensor gg = g.contiguous(), cnt = count.contiguous();
  const at::Tensor z = mz.has_value() ? mz->to(dt).contiguous() : at::Tensor();
  const at::Tensor sc = scale.to(dt).contiguous(), is = inv_std.to(dt).contiguous();
  const at::Tensor mu = mean.to(dt).contiguous(), pp = per_pixel.to(dt).contiguous();
  at::Tensor gbar = at::empty_like(gg), ggamma = at::empty({C}, gg.options());
  at::Tensor gbeta = at::empty_like(ggamma), gbias = at::empty_like(ggamma);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "gf_unit_backward", [&] {
    const scalar_t* zp = z.defined() ? z.const_data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto* counts) {
      unit_backward_kernel<scalar_t>(gg.const_data_ptr<scalar_t>(), counts, zp,
                                     sc.const_data_ptr<scalar_t>(), is.const_data_ptr<scalar_t>(),
                                     mu.const_data_ptr<scalar_t>(), pp.const_data_ptr<scalar_t>(),
                                     gscale, C, M, gbar.mutable_data_ptr<scalar_t>(),
                                     ggamma.mutable_data_ptr<scalar_t>(),
                                     gbeta.mutable_data_ptr<scalar_t>(),
                                     gbias.mutable_data_ptr<scalar_t>());
    };
    if (cnt.scalar_type() == at::kByte)
      run(cnt.const_data_ptr<uint8_t>());
    else
      run(cnt.const_data_ptr<scalar_t>());
  });
  return {gbar, ggamma, gbeta, gbias};
}

// A depthwise unit's products in one pass over its channels (they were three ATen ops and a
// copy, 40-60 us per unit on 960 × 64 patch values): from ḡ (C, M) and x̃ (C, M), the weight
// gradient Σ_m ḡ·x̃ written to every tap of the (C, 1, kh, kw) weight (summed taps), and
// g̃x = W̃ ḡ with W̃ = each channel's tap sum. Either may be skipped (undefined).
std::tuple<at::Tensor, at::Tensor> depthwise_unit_products(const at::Tensor& gbar,
                                                           const at::Tensor& xt,
                                                           const at::Tensor& weight,
                                                           bool need_w, bool need_x) {
  const int64_t C = gbar.size(0), M = gbar.size(1);
  const at::Tensor g = gbar.contiguous(), x = xt.contiguous(), w = weight.contiguous();
  const int64_t taps = w.numel() / std::max<int64_t>(C, 1);
  TORCH_CHECK(x.sizes() == g.sizes() && w.size(0) == C && w.size(1) == 1,
              "gradfilter native depthwise_unit_products: shapes do not match");
  at::Tensor gw = need_w ? at::empty_like(w) : at::Tensor();
  at::Tensor gx = need_x ? at::empty_like(g) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gf_dw_products", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *gp = g.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* gwp = need_w ? gw.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = need_x ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, C, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(M, 1)),
                     [&](int64_t c0, int64_t c1) {
      constexpr int64_t L = 8;  // independent partial sums
      for (int64_t c = c0; c < c1; ++c) {
        const scalar_t* __restrict__ gc = gp + c * M;
        if (gwp != nullptr) {
          const scalar_t* __restrict__ xc = xp + c * M;
          acc_t part[L] = {};
          int64_t m = 0;
          for (; m + L <= M; m += L)
            for (int64_t k = 0; k < L; ++k) part[k] += acc_t(gc[m + k]) * acc_t(xc[m + k]);
          for (; m < M; ++m) part[0] += acc_t(gc[m]) * acc_t(xc[m]);
          acc_t total = 0;
          for (int64_t k = 0; k < L; ++k) total += part[k];
          for (int64_t t = 0; t < taps; ++t) gwp[c * taps + t] = scalar_t(total);
        }
        if (gxp != nullptr) {
          acc_t ws = 0;
          for (int64_t t = 0; t < taps; ++t) ws += acc_t(wp[c * taps + t]);
          scalar_t* __restrict__ out = gxp + c * M;
          for (int64_t m = 0; m < M; ++m) out[m] = scalar_t(ws * acc_t(gc[m]));
        }
      }
    });
  });
  return {gw, gx};
}

// (C, N·Pc) values on a coarse grid repeated 2×2 onto the fine grid's patches, cropped: (C, N·Pf)
at::Tensor refine_2x2(const at::Tensor& t, int64_t N, int64_t ph, int64_t pw, int64_t fph,
                      int64_t fpw) {
  const int64_t C = t.size(0);
  return t.view({C, N, ph, 1, pw, 1})
      .expand({C, N, ph, 2, pw, 2})
      .reshape({C, N, 2 * ph, 2 * pw})
      .slice(2, 0, fph)
      .slice(3, 0, fpw)
      .reshape({C, N * fph * fpw});
}

// a @ b with the output's rows cut into one contiguous run per thread, each a single-threaded
// product. What reads the result next cuts its work the same way (unit_backward's channel loop
// over g̃x; the copy that spreads a k×k weight gradient), so each thread reads what its own core
// just wrote. Where the threads' cores do not share a cache (a VM can place its vCPUs so), the
// fused backward is then 0.25-1.2 ms shorter; elsewhere it is the same.
at::Tensor mm_rows(const at::Tensor& a_in, const at::Tensor& b_in) {
  // the pool's threads do not inherit the caller's no-grad mode: hand them plain tensors
  const at::Tensor a = a_in.detach(), b = b_in.detach();
  const int64_t M = a.size(0);
  at::Tensor out = at::empty({M, b.size(1)}, a.options());
  const int64_t T = std::min<int64_t>(at::get_num_threads(), M);
  if (T <= 1 || at::in_parallel_region()) return at::mm_out(out, a, b);
  const int64_t rows = (M + T - 1) / T;
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * rows, r1 = std::min(M, r0 + rows);
      if (r0 >= r1) continue;
      at::Tensor part = out.narrow(0, r0, r1 - r0);
      at::mm_out(part, a.narrow(0, r0, r1 - r0), b);
    }
  });
  return out;
}

// A fused block's whole backward (blocks/reference.py, FusedBlock.backward: the same steps, which there
// cost about a hundred microseconds of Python per unit inside a training step). g_out: the
// gradient of the block's output map, or (a pooled block's) its patch means (C, N, P); out_grid:
// the last unit's (k, top, left, ph, pw); per unit i: flags (1 strided, 2 need gW, 4 need the conv
// bias grad, 8 need γ's, 16 need β's, 32 depthwise),
// grids[4i..4i+3] its (ph, pw) and the (ph, pw) of the grid before it; in_grid: (need gx,
// skip, h, w, kh, kw, top, left); pool_in: the tiny-map unpooling matrix. Returns gx
// (undefined without need gx) and per unit (gW, bias, γ, β) grads, undefined where not asked
// for.
std::tuple<at::Tensor, std::vector<at::Tensor>> fused_block_backward(
    const at::Tensor& g_out, at::IntArrayRef out_grid, const at::Tensor& inv_counts,
    at::TensorList xt, at::TensorList count, at::TensorList mz, at::TensorList scale,
    at::TensorList inv_std, at::TensorList mean, at::TensorList weight, at::TensorList per_pixel,
    at::IntArrayRef flags, at::IntArrayRef grids, at::IntArrayRef in_grid,
    const std::optional<at::Tensor>& pool_in) {
  const int64_t U = static_cast<int64_t>(xt.size());
  TORCH_CHECK(U > 0 && count.size() == xt.size() && mz.size() == xt.size() &&
                  scale.size() == xt.size() && inv_std.size() == xt.size() &&
                  mean.size() == xt.size() && weight.size() == xt.size() &&
                  per_pixel.size() == xt.size() && static_cast<int64_t>(flags.size()) == U &&
                  static_cast<int64_t>(grids.size()) == 4 * U,
              "gradfilter native fused_block_backward: one entry per unit in every list");
  TORCH_CHECK(out_grid.size() == 5 && in_grid.size() == 8,
              "gradfilter native fused_block_backward: bad grid arguments");
  TORCH_CHECK(g_out.dim() == 4 || (g_out.dim() == 3 && in_grid[1] == 0),
              "gradfilter native fused_block_backward: g_out must be a 4-D map or, without "
              "a skip, its patch means (C, N, P)");
  const bool means = g_out.dim() == 3;  // a pooled block's: the caller has the patch means
  const int64_t N = g_out.size(means ? 1 : 0);
  at::Tensor g = means ? g_out.reshape({g_out.size(0), -1})
                       : std::get<0>(patch_sum_cm(g_out, out_grid[0], out_grid[0], out_grid[1],
                                                  out_grid[2], out_grid[3], out_grid[4], 1.0,
                                                  inv_counts));
  g = g.view({g.size(0), -1});  // patch means, channel-major
  std::vector<at::Tensor> grads(4 * U);
  const bool need_x = in_grid[0] != 0, skip = in_grid[1] != 0;
  for (int64_t i = U - 1; i >= 0; --i) {
    const int64_t f = flags[i];
    const bool strided = f & 1, depthwise = f & 32;
    std::optional<at::Tensor> m;
    if (f & 8) m = mz[i];
    auto [gbar, g_gamma, g_beta, g_bias] = unit_backward(
        g, count[i], m, scale[i], inv_std[i], mean[i], per_pixel[i], strided ? 0.25 : 1.0);
    if (f & 4) grads[4 * i + 1] = g_bias;
    if (f & 8) grads[4 * i + 2] = g_gamma;
    if (f & 16) grads[4 * i + 3] = g_beta;
    const at::Tensor& w = weight[i];
    const bool one = w.size(2) == 1 && w.size(3) == 1;
    const bool pass_down = i > 0 || need_x;
    if (depthwise) {
      auto [gw, gx_unit] = depthwise_unit_products(gbar, xt[i], w, f & 2, pass_down);
      if (f & 2) grads[4 * i] = gw;
      if (!pass_down) break;
      g = gx_unit;  // g̃x, one value per patch
    } else {
      if (f & 2) {
        const at::Tensor gw = mm_rows(gbar, xt[i].t());
        grads[4 * i] = one ? gw.view(w.sizes())
                           : gw.unsqueeze(-1).unsqueeze(-1).expand(w.sizes()).contiguous();
      }
      if (!pass_down) break;
      const at::Tensor wsum = one ? w.flatten(1) : tap_sum(w);  // W̃
      g = mm_rows(wsum.t(), gbar);  // g̃x, one value per patch
    }
    if (strided)
      g = refine_2x2(g, N, grids[4 * i], grids[4 * i + 1], grids[4 * i + 2], grids[4 * i + 3]);
  }
  at::Tensor gx;
  if (need_x) {  // unit 0's "grid before it" (grids[2], grids[3]) is the input's
    gx = unpool_channel_major(g, N, in_grid[2], in_grid[3], in_grid[4], in_grid[5], in_grid[6],
                              in_grid[7], grids[2], grids[3], pool_in);
    if (skip) gx.add_(g_out);
  }
  return {gx, grads};
}

// An eval BatchNorm's per-channel affine in one call (a fused unit's forward asked PyTorch for
// six small ops per unit): scale = γ/σ, shift = β − μ·γ/σ, inv_std = 1/σ with σ = sqrt(var + eps),
// computed in the statistics' dtype (float64 for float64 statistics, else float32) and
// returned in ``dtype`` (the map's). No γ: scale = 1/σ; no β: shift = −μ·scale.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_affine(
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, at::ScalarType dtype) {
  const int64_t C = mean.numel();
  TORCH_CHECK(mean.dim() == 1 && var.dim() == 1 && var.numel() == C,
              "gradfilter native bn_affine: mean and var must be 1-D of one length");
  TORCH_CHECK(!weight.has_value() || weight->numel() == C,
              "gradfilter native bn_affine: weight needs ", C, " values");
  TORCH_CHECK(!bias.has_value() || bias->numel() == C,
              "gradfilter native bn_affine: bias needs ", C, " values");
  const auto work = mean.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor mu = mean.to(work).contiguous(), v = var.to(work).contiguous();
  const at::Tensor w = weight.has_value() ? weight->detach().to(work).contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->detach().to(work).contiguous() : at::Tensor();
  at::Tensor scale = at::empty({C}, mu.options()), shift = at::empty_like(scale);
  at::Tensor inv_std = at::empty_like(scale);
  AT_DISPATCH_FLOATING_TYPES(work, "gf_bn_affine", [&] {
    const scalar_t *pm = mu.const_data_ptr<scalar_t>(), *pv = v.const_data_ptr<scalar_t>();
    const scalar_t* pw = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pb = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t *ps = scale.mutable_data_ptr<scalar_t>(), *pt = shift.mutable_data_ptr<scalar_t>();
    scalar_t* pi = inv_std.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t is = scalar_t(1) / std::sqrt(pv[c] + static_cast<scalar_t>(eps));
      const scalar_t sc = pw ? pw[c] * is : is;
      pi[c] = is;
      ps[c] = sc;
      pt[c] = pb ? pb[c] - pm[c] * sc : -pm[c] * sc;
    }
  });
  return {scale.to(dtype), shift.to(dtype), inv_std.to(dtype)};
}

// The patch sums of the last fused block's output, handed to the next fused block's forward
// when that block's input is that very tensor, unchanged: the next block then skips the pass
// that sums its input map (47-80 us per block on MobileNetV2's 7×7 maps). Identity is the
// TensorImpl, held weakly (its memory is not reused while the weak reference lives, and the
// output's graph is not kept alive); "unchanged" is its version counter, which every in-place
// op bumps (writes through `.data` do not, as they escape autograd's own checks of saved
// tensors). The sums are the last unit's output sums plus, with a skip, the input's: the same
// values as summing the output map, added in another order.
struct ForwardHandOff {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> out{
      c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
          c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>())};
  uint32_t version = 0;
  std::vector<int64_t> grid;
  at::Tensor sums;
};

ForwardHandOff& forward_hand_off() {
  thread_local ForwardHandOff h;
  return h;
}

std::atomic<int64_t> forward_hand_offs{0};  // forwards that took their input's sums from it

int64_t fused_hand_offs() { return forward_hand_offs.load(); }

// A fused block's forward (blocks/reference.py, FusedBlock.forward: the same steps, which there cost
// about a hundred microseconds of Python per unit inside a training step). in_grid: the input's
// patch grid (k, top, left, ph, pw); per unit i, geometry[16i..16i+15]: conv stride, its
// symmetric padding (h, w), explicit input padding (left, right, top, bottom: TF 'same'),
// groups, its output grid (k, top, left, ph, pw), whether x̃ is the previous grid coarsened
// 2×2, and that grid's (ph, pw); flags[i]: 1 keep Σ m·z (γ trainable), 2 byte counts, 4 conv
// bias, 8 BatchNorm γ, 16 BatchNorm β (absent tensors are passed as empty ones). Returns the
// block's output (with pool: its global average (N, C) instead, no skip) and per unit (x̃, mask
// count, Σ m·z or undefined, scale, 1/σ).
std::tuple<at::Tensor, std::vector<at::Tensor>> fused_block_forward(
    const at::Tensor& x, at::IntArrayRef in_grid, at::TensorList conv_weight,
    at::TensorList conv_bias, at::TensorList bn_mean, at::TensorList bn_var,
    at::TensorList bn_weight, at::TensorList bn_bias, at::ArrayRef<double> eps,
    at::ArrayRef<double> upper, at::IntArrayRef geometry, at::IntArrayRef flags, bool skip,
    bool pool) {
  const int64_t U = static_cast<int64_t>(conv_weight.size());
  TORCH_CHECK(U > 0 && conv_bias.size() == conv_weight.size() &&
                  bn_mean.size() == conv_weight.size() && bn_var.size() == conv_weight.size() &&
                  bn_weight.size() == conv_weight.size() &&
                  bn_bias.size() == conv_weight.size() && static_cast<int64_t>(eps.size()) == U &&
                  static_cast<int64_t>(upper.size()) == U &&
                  static_cast<int64_t>(geometry.size()) == 16 * U &&
                  static_cast<int64_t>(flags.size()) == U && in_grid.size() == 5,
              "gradfilter native fused_block_forward: one entry per unit in every list");
  TORCH_CHECK(x.dim() == 4, "gradfilter native fused_block_forward: x must be 4-D");
  TORCH_CHECK(!(skip && pool), "gradfilter native fused_block_forward: a pooled block has no skip");
  const int64_t N = x.size(0);
  ForwardHandOff& hand = forward_hand_off();
  at::Tensor ys;
  if (hand.out._unsafe_get_target() == x.unsafeGetTensorImpl() && !hand.out.expired() &&
      hand.version == x._version() && hand.sums.scalar_type() == x.scalar_type() &&
      hand.sums.size(0) == x.size(1) && hand.sums.size(1) == N * in_grid[3] * in_grid[4] &&
      std::equal(hand.grid.begin(), hand.grid.end(), in_grid.begin(), in_grid.end())) {
    ys = hand.sums;
    forward_hand_offs.fetch_add(1, std::memory_order_relaxed);
  } else {
    ys = std::get<0>(patch_sum_cm(x, in_grid[0], in_grid[0], in_grid[1], in_grid[2], in_grid[3],
                                  in_grid[4], 1.0, std::nullopt));
    ys = ys.view({ys.size(0), -1});
  }
  hand = ForwardHandOff();
  const at::Tensor in_sums = ys;
  std::vector<at::Tensor> saved;
  saved.reserve(5 * U);
  at::Tensor t = x;
  for (int64_t i = 0; i < U; ++i) {
    const int64_t* g = geometry.data() + 16 * i;
    const int64_t f = flags[i];
    at::Tensor xt = ys;
    if (g[13]) {  // x̃ of a stride-2 conv: 2×2 unions of the previous grid's patches
      const int64_t C = ys.size(0), fph = g[14], fpw = g[15], ph = g[11], pw = g[12];
      xt = at::constant_pad_nd(ys.view({C, N, fph, fpw}), {0, 2 * pw - fpw, 0, 2 * ph - fph})
               .view({C, N, ph, 2, pw, 2})
               .sum({3, 5})
               .reshape({C, N * ph * pw});
    }
    std::optional<at::Tensor> cb;
    if (f & 4) cb = conv_bias[i];
    std::optional<at::Tensor> gamma, beta;
    if (f & 8) gamma = bn_weight[i];
    if (f & 16) beta = bn_bias[i];
    auto [scale, shift, inv_std] = bn_affine(bn_mean[i], bn_var[i], gamma, beta, eps[i],
                                             t.scalar_type());
    // a pooled block's last unit: only its patch sums are used; its y is not written
    const bool last_pooled = pool && i == U - 1;
    const at::Tensor& w = conv_weight[i];
    const int64_t C = w.size(0), kh = w.size(2);
    // the output size of a stride-1 conv (padding symmetric g[1], g[2] plus explicit g[3..6])
    const int64_t pt = g[1] + g[5], pl = g[2] + g[3];
    const int64_t H1 = t.size(2) + pt + g[1] + g[6] - kh + 1;
    const int64_t W1 = t.size(3) + pl + g[2] + g[4] - w.size(3) + 1;
    at::Tensor y, count, mz, ysum;
    int64_t Hz, Wz;
    if (g[0] == 1 && dw_in_stats(t, w, g[7], H1, W1, g[11], g[12])) {
      std::tie(y, count, mz, ysum) = dw_stats_pass(t, w, cb, pt, pl, H1, W1, scale, shift,
                                                   upper[i], g[8], g[9], g[10], g[11], g[12],
                                                   (f & 2) != 0, !last_pooled);
      Hz = H1;
      Wz = W1;
    } else {
      at::Tensor in = t;
      if (g[3] || g[4] || g[5] || g[6]) in = at::constant_pad_nd(t, {g[3], g[4], g[5], g[6]});
      const at::Tensor z = at::conv2d(in, w, cb, {g[0], g[0]}, {g[1], g[2]}, {1, 1}, g[7])
                               .contiguous();
      std::tie(y, count, mz, ysum) = stats_pass(z, scale, shift, upper[i], g[8], g[9], g[10],
                                                g[11], g[12], (f & 2) != 0, !last_pooled,
                                                "fused_block_forward");
      Hz = z.size(2);
      Wz = z.size(3);
    }
    saved.push_back(xt);
    saved.push_back(count.view({C, -1}));
    saved.push_back((f & 1) ? mz.view({C, -1}) : at::Tensor());
    saved.push_back(scale);
    saved.push_back(inv_std);
    ys = ysum.view({C, -1});
    if (last_pooled) {  // the global average: the sum of the patch sums over H·W
      const int64_t k = g[8], H = Hz, W = Wz;
      TORCH_CHECK(g[9] >= 0 && g[10] >= 0 && g[11] * k - g[9] >= H && g[12] * k - g[10] >= W,
                  "gradfilter native fused_block_forward: pooling needs a grid that covers the map");
      return {ys.view({C, N, -1}).sum(2).t().div(static_cast<double>(H * W)).contiguous(), saved};
    }
    t = y;
  }
  if (skip) t = t + x;
  // the output's patch sums on the last unit's grid, for the next fused block (ForwardHandOff)
  const int64_t* last = geometry.data() + 16 * (U - 1);
  if (!skip || in_sums.sizes() == ys.sizes()) {
    hand.sums = skip ? ys + in_sums : ys;
    hand.grid.assign(last + 8, last + 13);
    hand.out = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
        t.getIntrusivePtr());
    hand.version = t._version();
  }
  return {t, saved};
}

// ---------------------------------------------------------------------------------------------
// A fused block as one C++ autograd node (blocks/modules.py, run_fused): fused_block_forward and
// fused_block_backward without Python between the module call and the kernels. Inside a training
// step the Python autograd Function around the two calls cost 130-170 us per block each way
// (interpreter state evicted by the block's own large ops); the node below does the same steps.

// A block's fixed arguments for one input size, batch and dtype (built once, blocks/native_plan.py).
// Forward: in_grid, geometry, flags (2 byte counts, 4 conv bias, 8 BatchNorm γ, 16 β: which
// parameters the block has), eps, upper, skip, pool as fused_block_forward takes them (bit 1,
// keep Σ m·z, is added per call: γ requires grad). Backward: out_grid, inv_counts, per_pixel,
// grids, flags (1 strided, 32 depthwise; the need bits are added per
// call), in_grid (its first entry, need gx, set per call), pool_in as fused_block_backward
// takes them; a pooled block's gradient (N, C) becomes patch means g/hw over `patches` patches.
struct FusedPlan : torch::CustomClassHolder {
  std::vector<int64_t> in_grid, geometry, flags;
  std::vector<double> eps, upper;
  bool skip, pool;
  std::vector<int64_t> out_grid;
  at::Tensor inv_counts;
  std::vector<at::Tensor> per_pixel;
  std::vector<int64_t> grids, back_flags, back_in_grid;
  std::optional<at::Tensor> pool_in;
  int64_t hw, patches;

  FusedPlan(std::vector<int64_t> in_grid, std::vector<int64_t> geometry,
            std::vector<int64_t> flags, std::vector<double> eps, std::vector<double> upper,
            bool skip, bool pool, std::vector<int64_t> out_grid, at::Tensor inv_counts,
            std::vector<at::Tensor> per_pixel, std::vector<int64_t> grids,
            std::vector<int64_t> back_flags, std::vector<int64_t> back_in_grid,
            std::optional<at::Tensor> pool_in, int64_t hw, int64_t patches)
      : in_grid(std::move(in_grid)), geometry(std::move(geometry)), flags(std::move(flags)),
        eps(std::move(eps)), upper(std::move(upper)), skip(skip), pool(pool),
        out_grid(std::move(out_grid)), inv_counts(std::move(inv_counts)),
        per_pixel(std::move(per_pixel)), grids(std::move(grids)),
        back_flags(std::move(back_flags)), back_in_grid(std::move(back_in_grid)),
        pool_in(std::move(pool_in)), hw(hw), patches(patches) {
    const size_t U = this->flags.size();
    TORCH_CHECK(U > 0 && this->eps.size() == U && this->upper.size() == U &&
                    this->geometry.size() == 16 * U && this->per_pixel.size() == U &&
                    this->grids.size() == 4 * U && this->back_flags.size() == U &&
                    this->in_grid.size() == 5 && this->out_grid.size() == 5 &&
                    this->back_in_grid.size() == 8 && this->hw > 0 && this->patches > 0,
                "gradfilter native FusedPlan: inconsistent block arguments");
  }
};

// The parameters a unit has, in the order fused_block takes them: conv weight, then conv bias,
// BatchNorm γ, β where its flags say it has them.
int64_t unit_params(int64_t f) { return 1 + ((f & 4) != 0) + ((f & 8) != 0) + ((f & 16) != 0); }

struct FusedBlockFn : public torch::autograd::Function<FusedBlockFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            at::TensorList params, at::TensorList stats,
                            const c10::intrusive_ptr<FusedPlan>& plan) {
    const int64_t U = static_cast<int64_t>(plan->flags.size());
    TORCH_CHECK(static_cast<int64_t>(stats.size()) == 2 * U,
                "gradfilter native fused_block: stats must hold each unit's running mean and "
                "variance");
    std::vector<at::Tensor> w(U), b(U), gamma(U), beta(U), mean(U), var(U);
    std::vector<int64_t> flags(plan->flags);
    size_t k = 0;
    for (int64_t i = 0; i < U; ++i) {
      const int64_t f = flags[i];
      TORCH_CHECK(k + unit_params(f) <= params.size(),
                  "gradfilter native fused_block: too few parameters");
      w[i] = params[k++];
      if (f & 4) b[i] = params[k++];
      if (f & 8) {
        gamma[i] = params[k++];
        if (gamma[i].requires_grad()) flags[i] |= 1;  // γ trains: keep Σ m·z
      }
      if (f & 16) beta[i] = params[k++];
      mean[i] = stats[2 * i];
      var[i] = stats[2 * i + 1];
    }
    TORCH_CHECK(k == params.size(), "gradfilter native fused_block: too many parameters");
    auto [out, flat] = fused_block_forward(x, plan->in_grid, w, b, mean, var, gamma, beta,
                                           plan->eps, plan->upper, plan->geometry, flags,
                                           plan->skip, plan->pool);
    torch::autograd::variable_list keep;
    keep.reserve(7 * U);
    for (int64_t i = 0; i < U; ++i) {  // what FusedBlock.forward saves
      for (int64_t j = 0; j < 5; ++j) keep.push_back(flat[5 * i + j]);
      keep.push_back(mean[i]);
      keep.push_back(w[i]);
    }
    ctx->save_for_backward(keep);
    ctx->saved_data["plan"] = plan;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "gradfilter: double backward through a fused block is not supported");
    const auto plan = ctx->saved_data["plan"].toCustomClass<FusedPlan>();
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    const int64_t U = static_cast<int64_t>(plan->flags.size());
    at::Tensor g = grads[0];
    if (plan->pool) {  // the mean's gradient g/(H·W) at every pixel: so are its patch means
      if (g.scalar_type() == at::kFloat && g.dim() == 2) {  // one loop (the ATen form: 50 us)
        const at::Tensor src = g.contiguous();
        const int64_t N = src.size(0), C = src.size(1), P = plan->patches;
        at::Tensor means = at::empty({C, N, P}, src.options());
        const float* gp = src.const_data_ptr<float>();
        float* out = means.mutable_data_ptr<float>();
        const float hw = static_cast<float>(plan->hw);
        for (int64_t c = 0; c < C; ++c)
          for (int64_t n = 0; n < N; ++n) {
            const float v = gp[n * C + c] / hw;
            for (int64_t p = 0; p < P; ++p) out[(c * N + n) * P + p] = v;
          }
        g = means;
      } else {
        g = g.t().div(static_cast<double>(plan->hw)).unsqueeze(-1)
                .expand({-1, -1, plan->patches}).contiguous();
      }
    }
    std::vector<int64_t> flags(plan->back_flags);
    size_t edge = 1;  // the inputs' order: x, then the parameters
    for (int64_t i = 0; i < U; ++i) {
      const int64_t f = plan->flags[i];
      if (ctx->needs_input_grad(edge++)) flags[i] |= 2;
      if ((f & 4) && ctx->needs_input_grad(edge++)) flags[i] |= 4;
      if ((f & 8) && ctx->needs_input_grad(edge++)) flags[i] |= 8;
      if ((f & 16) && ctx->needs_input_grad(edge++)) flags[i] |= 16;
    }
    std::vector<int64_t> in_grid(plan->back_in_grid);
    in_grid[0] = ctx->needs_input_grad(0) ? 1 : 0;
    std::vector<at::Tensor> xt(U), count(U), mz(U), scale(U), inv_std(U), mean(U), weight(U);
    for (int64_t i = 0; i < U; ++i) {
      xt[i] = saved[7 * i];
      count[i] = saved[7 * i + 1];
      mz[i] = saved[7 * i + 2];
      scale[i] = saved[7 * i + 3];
      inv_std[i] = saved[7 * i + 4];
      mean[i] = saved[7 * i + 5];
      weight[i] = saved[7 * i + 6];
    }
    auto [gx, unit_grads] = fused_block_backward(g, plan->out_grid, plan->inv_counts, xt, count,
                                                 mz, scale, inv_std, mean, weight,
                                                 plan->per_pixel, flags, plan->grids, in_grid,
                                                 plan->pool_in);
    torch::autograd::variable_list out;  // one per input: x, parameters, statistics, plan
    out.push_back(gx);
    for (int64_t i = 0; i < U; ++i) {
      const int64_t f = plan->flags[i];
      out.push_back(unit_grads[4 * i]);
      if (f & 4) out.push_back(unit_grads[4 * i + 1]);
      if (f & 8) out.push_back(unit_grads[4 * i + 2]);
      if (f & 16) out.push_back(unit_grads[4 * i + 3]);
    }
    out.resize(out.size() + 2 * U + 1);
    return out;
  }
};

at::Tensor fused_block(const at::Tensor& x, at::TensorList params, at::TensorList stats,
                       const c10::intrusive_ptr<FusedPlan>& plan) {
  return FusedBlockFn::apply(x, params, stats, plan);
}

// ---------------------------------------------------------------------------------------------
// A Linear layer's backward for small batches (the classifier of a fine-tuned CNN): both
// products in one pass over the weight. For g (B, O), x (B, I), W (O, I):
//   gx = g · W (B, I),   gW = gᵀ · x (O, I),   gb = Σ_b g.
// Each weight element is read once and each gradient element written once; both products use
// the same broadcasts of g. MKL's two GEMMs (behind torch.mm) handle these shapes badly: with
// B = 16, gW has an inner dimension of 16 and gx re-packs W, so at batch 16 they run at 70-80
// GFLOP/s on this project's 2-core CPU, this pass at 150-180 (docs/performance.md).
//
// Threads split the weight's rows into blocks of kLinearRows (each thread streams its own
// contiguous part; they write disjoint rows of gW and sum their gx parts at the end). Within a
// block, for each 16-wide column tile, gx's NB × 16 accumulators stay in registers while the
// block's rows stream past, four rows at a time (four independent gW accumulators).
constexpr int64_t kLinearRows = 64;
constexpr int64_t kLinearMaxBatch = 64;  // larger batches: MKL's GEMMs are at peak there

#if defined(GF_HAVE_AVX2_TARGET)
bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has && wide_simd();
}

// Rows [o0, o1) of W, every column tile, batch rows [b0, b0 + NB). first: gW's rows start at
// zero (the first batch chunk), else they accumulate. GX: also accumulate gx. stream: store gW
// with streaming stores.
template <int NB, bool GX>
__attribute__((target("avx512f"))) void linear_rows_avx512(
    const float* g, int64_t O, const float* x, const float* W, float* gW, float* gx, int64_t I,
    int64_t o0, int64_t o1, int64_t b0, bool first, bool stream) {
  const int64_t rem = I % 16;
  const __mmask16 tail = rem ? static_cast<__mmask16>((1u << rem) - 1) : __mmask16(0xFFFF);
  const int64_t tiles = (I + 15) / 16;
  for (int64_t t = 0; t < tiles; ++t) {
    const __mmask16 m = t == tiles - 1 ? tail : __mmask16(0xFFFF);
    const int64_t j = t * 16;
    __m512 acc[NB];
    if constexpr (GX)
      for (int b = 0; b < NB; ++b) acc[b] = _mm512_maskz_loadu_ps(m, gx + (b0 + b) * I + j);
    int64_t o = o0;
    for (; o + 4 <= o1; o += 4) {
      float* r = gW + o * I + j;
      const float* wr = W + o * I + j;
      __m512 w0, w1, w2, w3;
      if constexpr (GX) {
        w0 = _mm512_maskz_loadu_ps(m, wr);
        w1 = _mm512_maskz_loadu_ps(m, wr + I);
        w2 = _mm512_maskz_loadu_ps(m, wr + 2 * I);
        w3 = _mm512_maskz_loadu_ps(m, wr + 3 * I);
      }
      __m512 q0 = _mm512_setzero_ps(), q1 = q0, q2 = q0, q3 = q0;
      if (!first) {
        q0 = _mm512_maskz_loadu_ps(m, r);
        q1 = _mm512_maskz_loadu_ps(m, r + I);
        q2 = _mm512_maskz_loadu_ps(m, r + 2 * I);
        q3 = _mm512_maskz_loadu_ps(m, r + 3 * I);
      }
#pragma GCC unroll 16
      for (int b = 0; b < NB; ++b) {
        const float* gb = g + (b0 + b) * O + o;
        const __m512 xv = _mm512_maskz_loadu_ps(m, x + (b0 + b) * I + j);
        const __m512 s0 = _mm512_set1_ps(gb[0]), s1 = _mm512_set1_ps(gb[1]);
        const __m512 s2 = _mm512_set1_ps(gb[2]), s3 = _mm512_set1_ps(gb[3]);
        q0 = _mm512_fmadd_ps(s0, xv, q0);
        q1 = _mm512_fmadd_ps(s1, xv, q1);
        q2 = _mm512_fmadd_ps(s2, xv, q2);
        q3 = _mm512_fmadd_ps(s3, xv, q3);
        if constexpr (GX) {
          acc[b] = _mm512_fmadd_ps(s0, w0, acc[b]);
          acc[b] = _mm512_fmadd_ps(s1, w1, acc[b]);
          acc[b] = _mm512_fmadd_ps(s2, w2, acc[b]);
          acc[b] = _mm512_fmadd_ps(s3, w3, acc[b]);
        }
      }
      if (stream && m == __mmask16(0xFFFF)) {
        _mm512_stream_ps(r, q0);
        _mm512_stream_ps(r + I, q1);
        _mm512_stream_ps(r + 2 * I, q2);
        _mm512_stream_ps(r + 3 * I, q3);
      } else {
        _mm512_mask_storeu_ps(r, m, q0);
        _mm512_mask_storeu_ps(r + I, m, q1);
        _mm512_mask_storeu_ps(r + 2 * I, m, q2);
        _mm512_mask_storeu_ps(r + 3 * I, m, q3);
      }
    }
    for (; o < o1; ++o) {  // the block's last rows (O not a multiple of 4)
      __m512 w0 = _mm512_setzero_ps();
      if constexpr (GX) w0 = _mm512_maskz_loadu_ps(m, W + o * I + j);
      __m512 q0 = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, gW + o * I + j);
      for (int b = 0; b < NB; ++b) {
        const __m512 s0 = _mm512_set1_ps(g[(b0 + b) * O + o]);
        q0 = _mm512_fmadd_ps(s0, _mm512_maskz_loadu_ps(m, x + (b0 + b) * I + j), q0);
        if constexpr (GX) acc[b] = _mm512_fmadd_ps(s0, w0, acc[b]);
      }
      _mm512_mask_storeu_ps(gW + o * I + j, m, q0);
    }
    if constexpr (GX)
      for (int b = 0; b < NB; ++b) _mm512_mask_storeu_ps(gx + (b0 + b) * I + j, m, acc[b]);
  }
}

using LinearRowsFn = void (*)(const float*, int64_t, const float*, const float*, float*, float*,
                              int64_t, int64_t, int64_t, int64_t, bool, bool);

template <bool GX, int... NB>
constexpr std::array<LinearRowsFn, sizeof...(NB)> linear_rows_table(
    std::integer_sequence<int, NB...>) {
  return {&linear_rows_avx512<NB + 1, GX>...};
}

// gW (O, I), and gx (B, I) where given, for float32 contiguous g, x, W with
// B <= kLinearMaxBatch, on a CPU with AVX-512F. Threads split the rows of W (each streams its
// own contiguous part) and sum their gx parts at the end.
void linear_products_avx512(const float* g, const float* x, const float* W, float* gW,
                            float* gx, int64_t B, int64_t O, int64_t I) {
  static constexpr auto with_gx = linear_rows_table<true>(std::make_integer_sequence<int, 16>{});
  static constexpr auto without = linear_rows_table<false>(std::make_integer_sequence<int, 16>{});
  const int64_t blocks = (O + kLinearRows - 1) / kLinearRows;
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), blocks);
  // gW written once (one batch chunk), 64-byte aligned rows: streaming stores skip reading each
  // destination line first
  const bool stream = B <= 16 && I % 16 == 0 && reinterpret_cast<uintptr_t>(gW) % 64 == 0;
  std::vector<float> scratch(gx && parts > 1 ? (parts - 1) * B * I : 0, 0.0f);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* acc = gx == nullptr ? nullptr : p == 0 ? gx : scratch.data() + (p - 1) * B * I;
      const int64_t k0 = blocks * p / parts, k1 = blocks * (p + 1) / parts;
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t o0 = k * kLinearRows, o1 = std::min<int64_t>(O, o0 + kLinearRows);
        for (int64_t b0 = 0; b0 < B; b0 += 16) {
          const int nb = static_cast<int>(std::min<int64_t>(16, B - b0));
          const LinearRowsFn fn = acc ? with_gx[nb - 1] : without[nb - 1];
          fn(g, O, x, W, gW, acc, I, o0, o1, b0, b0 == 0, stream);
        }
      }
    }
    if (stream) _mm_sfence();  // each thread publishes its streaming stores
  });
  for (int64_t p = 1; gx && p < parts; ++p) {
    const float* part = scratch.data() + (p - 1) * B * I;
    for (int64_t i = 0; i < B * I; ++i) gx[i] += part[i];
  }
}

// y[b, o] = Σ_i x[b, i] W[o, i] (+ bias[o]) for NQ rows of W from row o, all rows of x, NB rows
// of x at a time (NB must divide B): NB × NQ accumulators across the columns, each reduced at
// the end. Only the edges run here (the last rows of W, a batch not a multiple of 4); every
// other tile is linear_forward_4x4_avx512's.
template <int NB, int NQ>
__attribute__((target("avx512f"))) void linear_forward_tile_avx512(
    const float* x, const float* W, const float* bias, float* y, int64_t B, int64_t O, int64_t I,
    int64_t o) {
  const int64_t rem = I % 16, full = I - rem;
  const __mmask16 tail = static_cast<__mmask16>((1u << rem) - 1);
  for (int64_t b0 = 0; b0 < B; b0 += NB) {
    __m512 acc[NB][NQ];
    for (int b = 0; b < NB; ++b)
      for (int q = 0; q < NQ; ++q) acc[b][q] = _mm512_setzero_ps();
    for (int64_t j = 0; j < I; j += 16) {
      const __mmask16 m = j < full ? __mmask16(0xFFFF) : tail;
      __m512 w[NQ];
      for (int q = 0; q < NQ; ++q) w[q] = _mm512_maskz_loadu_ps(m, W + (o + q) * I + j);
      for (int b = 0; b < NB; ++b) {
        const __m512 xv = _mm512_maskz_loadu_ps(m, x + (b0 + b) * I + j);
        for (int q = 0; q < NQ; ++q) acc[b][q] = _mm512_fmadd_ps(xv, w[q], acc[b][q]);
      }
    }
    for (int b = 0; b < NB; ++b)
      for (int q = 0; q < NQ; ++q)
        y[(b0 + b) * O + o + q] = _mm512_reduce_add_ps(acc[b][q]) + (bias ? bias[o + q] : 0.0f);
  }
}

// The 4 × 4 case of linear_forward_tile_avx512 in one pass over the columns (the batch-16
// classifier's every tile): named accumulators, which GCC keeps in registers (with an array it
// stored all sixteen on every iteration, 1.5x slower than MKL).
__attribute__((target("avx512f"))) void linear_forward_4x4_avx512(
    const float* x, const float* W, const float* bias, float* y, int64_t O, int64_t I,
    int64_t o, int64_t b0) {
  const int64_t rem = I % 16, full = I - rem;
  const __mmask16 tail = static_cast<__mmask16>((1u << rem) - 1);
  __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00,
         a12 = a00, a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00,
         a31 = a00, a32 = a00, a33 = a00;
  const float *w0 = W + o * I, *w1 = w0 + I, *w2 = w0 + 2 * I, *w3 = w0 + 3 * I;
  const float *x0 = x + b0 * I, *x1 = x0 + I, *x2 = x0 + 2 * I, *x3 = x0 + 3 * I;
  for (int64_t j = 0; j < I; j += 16) {
    const __mmask16 m = j < full ? __mmask16(0xFFFF) : tail;
    const __m512 v0 = _mm512_maskz_loadu_ps(m, w0 + j), v1 = _mm512_maskz_loadu_ps(m, w1 + j);
    const __m512 v2 = _mm512_maskz_loadu_ps(m, w2 + j), v3 = _mm512_maskz_loadu_ps(m, w3 + j);
// one row of x against the four weight rows: four accumulators a<R>0 .. a<R>3
#define GF_LINEAR_ROW(R, xr)                               \
  {                                                        \
    const __m512 u = _mm512_maskz_loadu_ps(m, (xr) + j);   \
    a##R##0 = _mm512_fmadd_ps(u, v0, a##R##0);             \
    a##R##1 = _mm512_fmadd_ps(u, v1, a##R##1);             \
    a##R##2 = _mm512_fmadd_ps(u, v2, a##R##2);             \
    a##R##3 = _mm512_fmadd_ps(u, v3, a##R##3);             \
  }
    GF_LINEAR_ROW(0, x0)
    GF_LINEAR_ROW(1, x1)
    GF_LINEAR_ROW(2, x2)
    GF_LINEAR_ROW(3, x3)
#undef GF_LINEAR_ROW
  }
  const float c0 = bias ? bias[o] : 0.0f, c1 = bias ? bias[o + 1] : 0.0f;
  const float c2 = bias ? bias[o + 2] : 0.0f, c3 = bias ? bias[o + 3] : 0.0f;
  float* r = y + b0 * O + o;
  // row R of the tile: y[b0 + R, o .. o + 3]
#define GF_LINEAR_STORE(R)                                 \
  r[R * O + 0] = _mm512_reduce_add_ps(a##R##0) + c0;       \
  r[R * O + 1] = _mm512_reduce_add_ps(a##R##1) + c1;       \
  r[R * O + 2] = _mm512_reduce_add_ps(a##R##2) + c2;       \
  r[R * O + 3] = _mm512_reduce_add_ps(a##R##3) + c3;
  GF_LINEAR_STORE(0)
  GF_LINEAR_STORE(1)
  GF_LINEAR_STORE(2)
  GF_LINEAR_STORE(3)
#undef GF_LINEAR_STORE
}

using LinearForwardFn = void (*)(const float*, const float*, const float*, float*, int64_t,
                                 int64_t, int64_t, int64_t);

// y (B, O) = x Wᵀ + bias for float32 contiguous x (B, I), W (O, I), B <= kLinearMaxBatch, on a
// CPU with AVX-512F; threads split the rows of W (the columns of y).
void linear_forward_avx512(const float* x, const float* W, const float* bias, float* y,
                           int64_t B, int64_t O, int64_t I) {
  // 4 rows of x per group where B divides so, else 1 (the group size must divide B)
  static constexpr LinearForwardFn by4[4] = {
      &linear_forward_tile_avx512<4, 1>, &linear_forward_tile_avx512<4, 2>,
      &linear_forward_tile_avx512<4, 3>, &linear_forward_tile_avx512<4, 4>};
  static constexpr LinearForwardFn by1[4] = {
      &linear_forward_tile_avx512<1, 1>, &linear_forward_tile_avx512<1, 2>,
      &linear_forward_tile_avx512<1, 3>, &linear_forward_tile_avx512<1, 4>};
  const int64_t quads = (O + 3) / 4;
  at::parallel_for(0, quads, 16, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t o = 4 * q, nq = std::min<int64_t>(4, O - o);
      if (nq == 4 && B % 4 == 0) {
        for (int64_t b0 = 0; b0 < B; b0 += 4) linear_forward_4x4_avx512(x, W, bias, y, O, I, o, b0);
      } else {  // the last rows of W, or a batch not a multiple of 4
        (B % 4 == 0 ? by4 : by1)[nq - 1](x, W, bias, y, B, O, I, o);
      }
    }
  });
}
#endif

// Whether the native linear kernels run for this batch (leading dimensions flattened) and dtype.
bool linear_fast_path(int64_t batch, at::ScalarType dtype) {
#if defined(GF_HAVE_AVX2_TARGET)
  return cpu_has_avx512f() && dtype == at::kFloat && batch >= 1 && batch <= kLinearMaxBatch;
#else
  return false;
#endif
}

// (gx, gW, gb) of y = x Wᵀ + b for g = ∂L/∂y; x (B, I) and g (B, O) already 2-D. Results not
// asked for come back undefined. The one-pass kernel where it applies, else ATen's products.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_2d(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, bool need_x, bool need_w,
    bool need_b) {
  at::Tensor gx, gw, gb;
  if (need_b) {
    if (g.scalar_type() == at::kFloat && g.is_contiguous()) {  // at::sum: 30-40 us at 16 x 1000
      const int64_t B = g.size(0), O = g.size(1);
      gb = at::zeros({O}, g.options());
      float* out = gb.mutable_data_ptr<float>();
      const float* gp = g.const_data_ptr<float>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t o = 0; o < O; ++o) out[o] += gp[b * O + o];
    } else {
      gb = g.sum(0);
    }
  }
  if (!need_x && !need_w) return {gx, gw, gb};
#if defined(GF_HAVE_AVX2_TARGET)
  const bool fast = need_w && linear_fast_path(g.size(0), g.scalar_type()) &&
                    x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat;
  if (fast) {
    const at::Tensor gc = g.contiguous(), xc = x.contiguous(), wc = weight.contiguous();
    const int64_t B = gc.size(0), O = gc.size(1), I = xc.size(1);
    gw = at::empty({O, I}, wc.options());
    if (need_x) gx = at::zeros({B, I}, xc.options());
    linear_products_avx512(gc.const_data_ptr<float>(), xc.const_data_ptr<float>(),
                           wc.const_data_ptr<float>(), gw.mutable_data_ptr<float>(),
                           need_x ? gx.mutable_data_ptr<float>() : nullptr, B, O, I);
    return {gx, gw, gb};
  }
#endif
  if (need_x) gx = at::mm(g, weight);
  if (need_w) gw = at::mm(g.t(), x);
  return {gx, gw, gb};
}

// The op behind gradfilter.native.linear_backward (tests call it against loop oracles).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, bool need_x, bool need_w,
    bool need_b) {
  TORCH_CHECK(g.dim() == 2 && x.dim() == 2 && weight.dim() == 2,
              "gradfilter native linear_backward: g, x and weight must be 2-D");
  TORCH_CHECK(g.size(0) == x.size(0) && g.size(1) == weight.size(0) &&
                  x.size(1) == weight.size(1),
              "gradfilter native linear_backward: shapes do not match: g ", g.sizes(), ", x ",
              x.sizes(), ", weight ", weight.sizes());
  return linear_backward_2d(g, x, weight, need_x, need_w, need_b);
}

// y = x Wᵀ + b: the one-pass kernel where it applies (float32, contiguous, batch of flattened
// leading dimensions <= kLinearMaxBatch, AVX-512F), else at::linear.
at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias) {
#if defined(GF_HAVE_AVX2_TARGET)
  const bool has_bias = bias.has_value() && bias->defined();
  if (x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1) && x.numel() > 0 &&
      x.is_contiguous() && weight.is_contiguous() && x.scalar_type() == at::kFloat &&
      weight.scalar_type() == at::kFloat &&
      (!has_bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                     bias->dim() == 1 && bias->size(0) == weight.size(0))) &&
      linear_fast_path(x.numel() / x.size(-1), at::kFloat)) {
    const int64_t I = weight.size(1), O = weight.size(0), B = x.numel() / I;
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = O;
    at::Tensor y = at::empty(shape, x.options());
    linear_forward_avx512(x.const_data_ptr<float>(), weight.const_data_ptr<float>(),
                          has_bias ? bias->const_data_ptr<float>() : nullptr,
                          y.mutable_data_ptr<float>(), B, O, I);
    return y;
  }
#endif
  return at::linear(x, weight, bias);
}

// y = x Wᵀ + b recording one C++ autograd node whose backward is linear_backward_2d (any
// leading dimensions of x flatten into the batch).
struct LinearFn : public torch::autograd::Function<LinearFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    ctx->save_for_backward({x, weight});
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["bias"] = has_bias;
    return linear_forward(x, weight, bias);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "gradfilter: double backward through a native linear is not supported");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const int64_t I = weight.size(1), O = weight.size(0);
    const at::Tensor g = grads[0].reshape({-1, O});
    const bool has_bias = ctx->saved_data["bias"].toBool();
    auto [gx, gw, gb] = linear_backward_2d(g, x.reshape({-1, I}), weight,
                                           ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                           has_bias && ctx->needs_input_grad(2));
    if (gx.defined()) gx = gx.view(x.sizes());
    return {gx, gw, gb};
  }
};

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  return LinearFn::apply(x, weight, bias);
}


// ---------------------------------------------------------------------------------------------
// Evicting tensors' memory from every cache level of every core (clflushopt, clflush where the
// CPU lacks it), ahead of an optimizer step (src/gradfilter/optim.py, flush_before_step). Where
// two cores share no cache (a VM whose vCPUs sit on different core complexes), a parameter line
// that both threads read in the forward and the fused backward is still in both caches when the
// optimizer writes it, and each write waits for the other core's copy to be invalidated:
// MobileNetV2 last 4's fused SGD step took 3.7-3.9 instead of 1.0 ms. Flushing the parameters
// first (0.27 ms) brings it back. Returns false where it cannot flush.
#if defined(GF_HAVE_AVX2_TARGET)
bool cpu_has_clflushopt() {
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, nullptr) < 7) return false;
    __cpuid_count(7, 0, a, b, c, d);
    return ((b >> 23) & 1u) != 0;
  }();
  return has;
}

__attribute__((target("clflushopt"))) void flush_lines_opt(const char* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64) _mm_clflushopt(const_cast<char*>(p + i));
}

void flush_lines(const char* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64) _mm_clflush(p + i);
}
#endif

bool flush_cache(at::TensorList tensors) {
  for (const at::Tensor& t : tensors)
    TORCH_CHECK(!t.defined() || t.device().is_cpu(),
                "gradfilter native flush_cache: CPU tensors only, got one on ", t.device());
#if defined(GF_HAVE_AVX2_TARGET)
  const bool opt = cpu_has_clflushopt();
  for (const at::Tensor& t : tensors) {
    if (!t.defined() || t.numel() == 0) continue;
    int64_t span = 1;  // elements from the first to one past the last (non-negative strides)
    for (int64_t d = 0; d < t.dim(); ++d) {
      TORCH_CHECK(t.stride(d) >= 0, "gradfilter native flush_cache: negative strides");
      span += (t.size(d) - 1) * t.stride(d);
    }
    const auto start = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    const uintptr_t first = start & ~uintptr_t(63);
    const int64_t bytes = static_cast<int64_t>(start - first) + span * t.element_size();
    const char* base = reinterpret_cast<const char*>(first);
    at::parallel_for(0, (bytes + 63) / 64, 1024, [&](int64_t l0, int64_t l1) {
      if (opt)
        flush_lines_opt(base + 64 * l0, 64 * (l1 - l0));
      else
        flush_lines(base + 64 * l0, 64 * (l1 - l0));
      _mm_sfence();
    });
  }
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(gradfilter, m) {
  m.def("flush_cache(Tensor[] tensors) -> bool");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_backward(Tensor g, Tensor x, Tensor weight, bool need_x, bool need_w, "
        "bool need_b) -> (Tensor, Tensor, Tensor)");
  m.def("linear_fast_path(int batch, ScalarType dtype) -> bool", TORCH_FN(linear_fast_path));
  m.def("fused_hand_offs() -> int", TORCH_FN(fused_hand_offs));
  m.def("fused_dw_passes() -> int", TORCH_FN(fused_dw_passes));
  m.def("set_simd(int level) -> int", TORCH_FN(set_simd));
  m.class_<FusedPlan>("FusedPlan")
      .def(torch::init<std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                       std::vector<double>, std::vector<double>, bool, bool,
                       std::vector<int64_t>, at::Tensor, std::vector<at::Tensor>,
                       std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                       std::optional<at::Tensor>, int64_t, int64_t>());
  m.def("fused_block(Tensor x, Tensor[] params, Tensor[] stats, "
        "__torch__.torch.classes.gradfilter.FusedPlan plan) -> Tensor");
  m.def("patch_sum(Tensor x, int kh, int kw, int top, int left, int ph, int pw) -> Tensor");
  m.def("unpool(Tensor g, int h, int w, int kh, int kw, int top, int left) -> Tensor");
  m.def("masked_clamp(Tensor x, float upper) -> (Tensor, Tensor)");
  m.def("mask_apply(Tensor g, Tensor bits) -> Tensor");
  m.def("bn_act_stats(Tensor z, Tensor scale, Tensor shift, float upper, int k, int top, int left, "
        "int ph, int pw, bool count_u8=False, bool store=True) -> (Tensor?, Tensor, Tensor, Tensor)");
  m.def("unit_backward(Tensor g, Tensor count, Tensor? mz, Tensor scale, Tensor inv_std, "
        "Tensor mean, Tensor per_pixel, float gscale) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_affine(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, ScalarType dtype) -> (Tensor, Tensor, Tensor)");
  m.def("patch_sum_cm(Tensor x, int kh, int kw, int top, int left, int ph, int pw, float scale, Tensor? map) -> (Tensor, Tensor)");
  m.def("fused_block_backward(Tensor g_out, int[] out_grid, Tensor inv_counts, Tensor[] xt, Tensor[] count, Tensor[] mz, Tensor[] scale, Tensor[] inv_std, Tensor[] mean, Tensor[] weight, Tensor[] per_pixel, int[] flags, int[] grids, int[] in_grid, Tensor? pool_in) -> (Tensor, Tensor[])");
  m.def("fused_block_forward(Tensor x, int[] in_grid, Tensor[] conv_weight, Tensor[] conv_bias, Tensor[] bn_mean, Tensor[] bn_var, Tensor[] bn_weight, Tensor[] bn_bias, float[] eps, float[] upper, int[] geometry, int[] flags, bool skip, bool pool=False) -> (Tensor, Tensor[])");
  m.def("filtered_backward(Tensor gy, Tensor xt, Tensor weight, int kh, int kw, int rh, int rw, "
        "int out_top, int out_left, int ph, int pw, int in_kh, int in_kw, int in_top, int in_left, "
        "int h, int w, float scale, Tensor? map, bool need_x, bool need_w, Tensor? pool_in) -> "
        "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gradfilter, CPU, m) {
  m.impl("patch_sum", TORCH_FN(patch_sum));
  m.impl("unpool", TORCH_FN(unpool));
  m.impl("masked_clamp", TORCH_FN(masked_clamp));
  m.impl("mask_apply", TORCH_FN(mask_apply));
  m.impl("bn_act_stats", TORCH_FN(bn_act_stats));
  m.impl("unit_backward", TORCH_FN(unit_backward));
  m.impl("bn_affine", TORCH_FN(bn_affine));
  m.impl("patch_sum_cm", TORCH_FN(patch_sum_cm));
  m.impl("fused_block_backward", TORCH_FN(fused_block_backward));
  m.impl("fused_block_forward", TORCH_FN(fused_block_forward));
  m.impl("filtered_backward", TORCH_FN(filtered_backward));
  m.impl("flush_cache", TORCH_FN(flush_cache));
  m.impl("linear_backward", TORCH_FN(linear_backward));
}

// fused_block records its own autograd node (FusedBlockFn), so it sits above autograd
TORCH_LIBRARY_IMPL(gradfilter, CompositeImplicitAutograd, m) {
  m.impl("fused_block", TORCH_FN(fused_block));
  m.impl("linear", TORCH_FN(linear));
}
