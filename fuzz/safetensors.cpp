// Safetensors reader: the fuzz input is the whole file (written to a scratch
// file, as the reader takes paths). A malformed file must be a dsa::Error;
// for a file the reader accepts, every tensor must read back with exactly the
// bytes and element count its header promises, in every conversion allowed.
#include <cstdint>
#include <string>

#include "dsa/error.h"
#include "dsa/safetensors.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = dsa_fuzz::scratch_dir() / "input.safetensors";
  dsa_fuzz::write_file(path, data, size);
  try {
    const dsa::st::Reader r(path.string());
    for (const auto& t : r.tensors()) {
      if (t.begin < 0 || t.end < t.begin || t.end > static_cast<int64_t>(size)) dsa_fuzz::fail("tensor range outside the file");
      if (!r.has(t.name) || &r.info(t.name) != &t) dsa_fuzz::fail("info() does not find a listed tensor");
      const auto b = r.bytes(t.name);
      if (static_cast<int64_t>(b.size()) != t.end - t.begin) dsa_fuzz::fail("bytes() size differs from the data range");
      const int64_t n = t.numel();
      if (n * dsa::st::dtype_size(t.dtype) != t.end - t.begin) dsa_fuzz::fail("numel * dtype size differs from the data range");
      if (n > 0) (void)dsa::st::index_string(t.shape, n - 1);
      (void)dsa::st::shape_string(t.shape);
      r.expect_shape(t.name, t.shape);
      try {
        if (static_cast<int64_t>(r.read_f32(t.name).size()) != n) dsa_fuzz::fail("read_f32 element count");
      } catch (const dsa::FileError&) {
      }
      try {
        if (static_cast<int64_t>(r.read_bf16(t.name).size()) != n) dsa_fuzz::fail("read_bf16 element count");
      } catch (const dsa::FileError&) {
      }
      try {
        if (static_cast<int64_t>(r.read_i64(t.name).size()) != n) dsa_fuzz::fail("read_i64 element count");
      } catch (const dsa::FileError&) {
      }
    }
    (void)r.has("no such tensor");
  } catch (const dsa::Error&) {
  }
  return 0;
}
