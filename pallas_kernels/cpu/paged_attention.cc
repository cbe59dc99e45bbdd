// Paged attention on the CPU: each sequence's queries (one in decode, a chunk in prefill) over its
// cached pages plus the step's own new keys, read in place from the unified pool (XLA gathers every
// page into a new array, concatenates the new keys, transposes, and runs two small dots per layer).
//
// Pool [L, U, Dh]: token slot s of page p keeps its K heads at units p*PU + s*2*Hkv + [0, Hkv) and its
// V heads right after (PU = page_size * 2 * Hkv). Query t of sequence b (t < new_lens[b], at
// positions[b, t]) attends to cached positions [0, cached_lens[b]) through page_tables[b] and to the
// step's new keys j < new_lens[b] with positions[b, j] <= positions[b, t]; with a sliding window only
// to keys less than `window` positions back. Query head h reads KV head h / (Hq / Hkv). Queries past
// new_lens[b] (padding) and queries with no key get zeros.
//
// One work item is one (sequence, KV head): its query heads share every K and V row it reads.
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jlora_cpu::axpy;
using jlora_cpu::dot;

int64_t clamp(int64_t v, int64_t hi) { return v < 0 ? 0 : (v > hi ? hi : v); }

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                              ffi::Buffer<ffi::F32> v_new, ffi::Buffer<ffi::F32> rows,
                              ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> page_tables,
                              ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> cached_lens,
                              ffi::Buffer<ffi::S32> new_lens, ffi::ResultBuffer<ffi::F32> out,
                              int64_t page_size, int64_t window) {
  const auto qd = q.dimensions();
  const auto kd = k_new.dimensions();
  const auto pd = rows.dimensions();
  const auto td = page_tables.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || pd.size() != 3 || td.size() != 2)
    return ffi::Error::InvalidArgument("paged_attention: q [B, T, Hq, Dh], k [B, T, Hkv, Dh], pool [L, U, Dh]");
  const int64_t B = qd[0], T = qd[1], Hq = qd[2], Dh = qd[3], Hkv = kd[2];
  const int64_t L = pd[0], U = pd[1], P = td[1];
  if (Hq % Hkv || kd[0] != B || kd[1] != T || kd[3] != Dh || pd[2] != Dh || td[0] != B || page_size <= 0)
    return ffi::Error::InvalidArgument("paged_attention: shapes do not agree");
  const int32_t l = layer.typed_data()[0];
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("paged_attention: layer out of range");
  const int64_t G = Hq / Hkv, PU = page_size * 2 * Hkv;
  const float* base = rows.typed_data() + l * U * Dh;
  const float* qp = q.typed_data();
  const float* kp = k_new.typed_data();
  const float* vp = v_new.typed_data();
  const int32_t* tables = page_tables.typed_data();
  const int32_t* pos = positions.typed_data();
  const int32_t* lens = cached_lens.typed_data();
  const int32_t* news = new_lens.typed_data();
  float* op = out->typed_data();
  const float scale = 1.f / std::sqrt(static_cast<float>(Dh));
  auto item = [=](int64_t i) {
    const int64_t b = i / Hkv, g = i % Hkv;
    const int64_t n = clamp(lens[b], P * page_size), nt = clamp(news[b], T);
    thread_local std::vector<const float*> cached;  // K rows of the cached keys (nullptr: bad page)
    thread_local std::vector<float> scores;         // [G, keys] of one query
    cached.assign(n, nullptr);
    for (int64_t s = 0; s < n; ++s) {
      const int64_t page = tables[b * P + s / page_size];
      const int64_t unit = page * PU + (s % page_size) * 2 * Hkv + g;
      if (page >= 0 && unit + Hkv < U) cached[s] = base + unit * Dh;
    }
    for (int64_t t = 0; t < T; ++t) {
      float* o = op + ((b * T + t) * Hq + g * G) * Dh;
      for (int64_t x = 0; x < G * Dh; ++x) o[x] = 0.f;
      if (t >= nt) continue;
      const int64_t qpos = pos[b * T + t];
      const int64_t first = window > 0 ? clamp(qpos - window + 1, n) : 0;
      const int64_t nc = n - first, keys = nc + nt;
      scores.assign(G * keys, -INFINITY);
      const float* qh = qp + ((b * T + t) * Hq + g * G) * Dh;
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t s = first + c;
        if (!cached[s] || s > qpos) continue;
        for (int64_t h = 0; h < G; ++h) scores[h * keys + c] = dot(qh + h * Dh, cached[s], Dh) * scale;
      }
      for (int64_t j = 0; j < nt; ++j) {
        const int64_t kpos = pos[b * T + j];
        if (kpos > qpos || (window > 0 && qpos - kpos >= window)) continue;
        const float* krow = kp + ((b * T + j) * Hkv + g) * Dh;
        for (int64_t h = 0; h < G; ++h) scores[h * keys + nc + j] = dot(qh + h * Dh, krow, Dh) * scale;
      }
      for (int64_t h = 0; h < G; ++h) {
        float* sc = scores.data() + h * keys;
        float mx = -INFINITY;
        for (int64_t k = 0; k < keys; ++k) mx = sc[k] > mx ? sc[k] : mx;
        if (mx == -INFINITY) {  // no key: zeros
          for (int64_t k = 0; k < keys; ++k) sc[k] = 0.f;
          continue;
        }
        float sum = 0.f;
        for (int64_t k = 0; k < keys; ++k) sum += (sc[k] = std::exp(sc[k] - mx));
        for (int64_t k = 0; k < keys; ++k) sc[k] /= sum;
      }
      for (int64_t k = 0; k < keys; ++k) {
        const float* v = k < nc ? (cached[first + k] ? cached[first + k] + Hkv * Dh : nullptr)
                                : vp + ((b * T + (k - nc)) * Hkv + g) * Dh;
        if (!v) continue;
        for (int64_t h = 0; h < G; ++h) {
          const float p = scores[h * keys + k];
          if (p != 0.f) axpy(p, v, o + h * Dh, Dh);
        }
      }
    }
  };
  jlora_cpu::parallel_for(pool, B * Hkv, pool.num_threads() - 1, item);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedAttention, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("page_size")
                                  .Attr<int64_t>("window"));
