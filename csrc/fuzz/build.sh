#!/usr/bin/env bash
# Build the libFuzzer harnesses for the C GENEVE decoder and its option walkers, with
# ASan and UBSan.
#
#   bash csrc/fuzz/build.sh            # -> csrc/fuzz/build/fuzz_{decode,options} (+ _selftest)
#   csrc/fuzz/build/fuzz_decode -max_total_time=60 csrc/fuzz/build/corpus
#
# It compiles csrc/codec.c directly (not the cffi module). The _selftest variant adds
# deliberate bugs behind magic inputs so tests can prove the sanitizers fire.
# CC may name another clang (default: clang, else clang-14).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
csrc="$(dirname "$here")"
out="$here/build"
mkdir -p "$out"
cc="${CC:-}"
if [[ -z "$cc" ]]; then
    cc="$(command -v clang || command -v clang-14 || true)"
fi
[[ -n "$cc" ]] || { echo "build.sh: clang not found (apt install clang libclang-rt-14-dev)" >&2; exit 2; }
flags=(
    -std=gnu11 -g -O1 -Wall -Wextra -Werror
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
    -fno-omit-frame-pointer -I "$csrc"
)
for target in fuzz_decode fuzz_options; do
    "$cc" "${flags[@]}" "$here/$target.c" "$csrc/codec.c" -o "$out/$target"
    "$cc" "${flags[@]}" -DGDP_FUZZ_SELFTEST "$here/$target.c" "$csrc/codec.c" \
        -o "$out/${target}_selftest"
    echo "built $out/$target and $out/${target}_selftest"
done
# The authenticated-tunnel receive check (csrc/auth.c), linked with libsodium.
"$cc" "${flags[@]}" "$here/fuzz_auth.c" "$csrc/auth.c" -lsodium -o "$out/fuzz_auth"
"$cc" "${flags[@]}" -DGDP_FUZZ_SELFTEST "$here/fuzz_auth.c" "$csrc/auth.c" -lsodium \
    -o "$out/fuzz_auth_selftest"
echo "built $out/fuzz_auth and $out/fuzz_auth_selftest"
