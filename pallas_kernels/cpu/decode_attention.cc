// Paged decode attention on the CPU: one query per sequence over its cached pages plus its own new
// key, read in place from the unified pool (XLA gathers every page into a new array, concatenates
// the new key, transposes, and runs two small dots per layer).
//
// Pool [L, U, Dh]: token slot s of page p keeps its K heads at units p*PU + s*2*Hkv + [0, Hkv) and its
// V heads right after (PU = page_size * 2 * Hkv). Sequence b's keys are positions [0, cached_lens[b])
// through page_tables[b], then the step's own k_new[b] at positions[b]; with a sliding window only
// keys with positions[b] - position < window count. Query head h reads KV head h / (Hq / Hkv).
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

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                               ffi::Buffer<ffi::F32> v_new, ffi::Buffer<ffi::F32> rows,
                               ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> page_tables,
                               ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> cached_lens,
                               ffi::ResultBuffer<ffi::F32> out, int64_t page_size, int64_t window) {
  const auto qd = q.dimensions();
  const auto kd = k_new.dimensions();
  const auto pd = rows.dimensions();
  const auto td = page_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || pd.size() != 3 || td.size() != 2)
    return ffi::Error::InvalidArgument("decode_attention: q [B, Hq, Dh], k [B, Hkv, Dh], pool [L, U, Dh]");
  const int64_t B = qd[0], Hq = qd[1], Dh = qd[2], Hkv = kd[1], L = pd[0], U = pd[1], P = td[1];
  if (Hq % Hkv || kd[0] != B || kd[2] != Dh || pd[2] != Dh || td[0] != B || page_size <= 0)
    return ffi::Error::InvalidArgument("decode_attention: shapes do not agree");
  const int32_t l = layer.typed_data()[0];
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("decode_attention: layer out of range");
  const int64_t G = Hq / Hkv, PU = page_size * 2 * Hkv;
  const float* base = rows.typed_data() + l * U * Dh;
  const float* qp = q.typed_data();
  const float* kp = k_new.typed_data();
  const float* vp = v_new.typed_data();
  const int32_t* tables = page_tables.typed_data();
  const int32_t* pos = positions.typed_data();
  const int32_t* lens = cached_lens.typed_data();
  float* op = out->typed_data();
  const float scale = 1.f / std::sqrt(static_cast<float>(Dh));
  auto item = [=](int64_t i) {
    const int64_t b = i / Hkv, g = i % Hkv;
    int64_t n = lens[b] < 0 ? 0 : lens[b];
    if (n > P * page_size) n = P * page_size;
    int64_t first = 0;  // the oldest cached key inside the window
    if (window > 0 && pos[b] - window + 1 > first) first = pos[b] - window + 1;
    if (first > n) first = n;
    const int64_t keys = n - first + 1;  // cached keys in the window, then the new one
    thread_local std::vector<float> scores;
    thread_local std::vector<const float*> krow;
    scores.assign(G * keys, 0.f);
    krow.assign(keys, nullptr);
    for (int64_t s = first; s < n; ++s) {
      const int64_t page = tables[b * P + s / page_size];
      const int64_t unit = page * PU + (s % page_size) * 2 * Hkv + g;
      if (page >= 0 && unit + Hkv < U) krow[s - first] = base + unit * Dh;
    }
    krow[keys - 1] = kp + (b * Hkv + g) * Dh;
    const float* qh = qp + (b * Hq + g * G) * Dh;
    for (int64_t j = 0; j < keys; ++j)
      for (int64_t h = 0; h < G; ++h)
        scores[h * keys + j] = krow[j] ? dot(qh + h * Dh, krow[j], Dh) * scale : -INFINITY;
    for (int64_t h = 0; h < G; ++h) {
      float* sc = scores.data() + h * keys;
      float mx = -INFINITY;
      for (int64_t j = 0; j < keys; ++j) mx = sc[j] > mx ? sc[j] : mx;
      float sum = 0.f;
      for (int64_t j = 0; j < keys; ++j) sum += (sc[j] = std::exp(sc[j] - mx));
      for (int64_t j = 0; j < keys; ++j) sc[j] /= sum;
    }
    float* o = op + (b * Hq + g * G) * Dh;
    for (int64_t x = 0; x < G * Dh; ++x) o[x] = 0.f;
    for (int64_t j = 0; j < keys; ++j) {
      if (!krow[j]) continue;
      const float* v = j == keys - 1 ? vp + (b * Hkv + g) * Dh : krow[j] + Hkv * Dh;
      for (int64_t h = 0; h < G; ++h) {
        const float p = scores[h * keys + j];
        float* oh = o + h * Dh;
        axpy(p, v, oh, Dh);
      }
    }
  };
  jlora_cpu::parallel_for(pool, B * Hkv, pool.num_threads() - 1, item);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodeAttention, DecodeAttentionImpl,
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
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("page_size")
                                  .Attr<int64_t>("window"));
