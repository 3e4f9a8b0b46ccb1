#!/usr/bin/env bash
# Build the libFuzzer harnesses, with ASan and UBSan: the C GENEVE decoder and its
# option walkers (codec.c), receive coalescing (gro.c) and TSO segmentation (seg.c).
#
#   bash csrc/fuzz/build.sh   # -> csrc/fuzz/build/fuzz_{decode,options,gro,seg} (+ _selftest)
#   csrc/fuzz/build/fuzz_decode -max_total_time=60 csrc/fuzz/build/corpus
#
# It compiles the C files directly (not the cffi module); the engine's pure parts are
# reached through testpoints.c. The _selftest variant adds deliberate bugs behind magic
# inputs so tests can prove the sanitizers and the cross-checks fire.
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
codec=("$csrc/codec.c")
pure=("$csrc/testpoints.c" "$csrc/gro.c" "$csrc/seg.c" "$csrc/inner.c")
for target in fuzz_decode fuzz_options fuzz_gro fuzz_seg; do
    case "$target" in
        fuzz_decode | fuzz_options) srcs=("${codec[@]}") ;;
        *) srcs=("${pure[@]}") ;;
    esac
    "$cc" "${flags[@]}" "$here/$target.c" "${srcs[@]}" -o "$out/$target"
    "$cc" "${flags[@]}" -DGDP_FUZZ_SELFTEST "$here/$target.c" "${srcs[@]}" \
        -o "$out/${target}_selftest"
    echo "built $out/$target and $out/${target}_selftest"
done
# The authenticated-tunnel receive check (csrc/auth.c), linked with libsodium.
"$cc" "${flags[@]}" "$here/fuzz_auth.c" "$csrc/auth.c" -lsodium -o "$out/fuzz_auth"
"$cc" "${flags[@]}" -DGDP_FUZZ_SELFTEST "$here/fuzz_auth.c" "$csrc/auth.c" -lsodium \
    -o "$out/fuzz_auth_selftest"
echo "built $out/fuzz_auth and $out/fuzz_auth_selftest"
