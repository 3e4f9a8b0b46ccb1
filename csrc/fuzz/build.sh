#!/usr/bin/env bash
# Build the libFuzzer harnesses, with ASan and UBSan: the C GENEVE decoder and its
# option walkers (codec.c), receive coalescing (gro.c), TSO segmentation (seg.c) and the
# authenticated-tunnel receive check (auth.c, linked with libsodium).
#
#   bash csrc/fuzz/build.sh   # -> csrc/fuzz/build/fuzz_{decode,options,gro,seg,auth} (+ _selftest)
#   csrc/fuzz/build/fuzz_decode -max_total_time=60 csrc/fuzz/build/corpus
#
# Long campaigns (releases): `python -m bench.fuzz --minutes 10` (fuzz_decode and
# fuzz_options, with line coverage), or one harness at a time, e.g.
#   csrc/fuzz/build/fuzz_gro -max_total_time=600 -max_len=8192 csrc/fuzz/build/corpus-fuzz_gro
# tests/test_fuzz_c.py runs every harness briefly and side by side (GDP_FUZZ_SECONDS).
#
# It compiles the C files directly (not the cffi module); the engine's pure parts are
# reached through testpoints.c. The _selftest variant adds deliberate bugs behind magic
# inputs so tests can prove the sanitizers and the cross-checks fire.
# Builds run one clang per core (JOBS overrides) and are skipped when the digest of the
# sources, this script and the compiler matches the last complete build's (build/.digest).
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
auth=("$csrc/auth.c")
targets=(fuzz_decode fuzz_options fuzz_gro fuzz_seg fuzz_auth)

digest="$(
    {
        "$cc" --version
        cat "$0" "$csrc"/*.c "$csrc"/*.h "$here"/*.c
    } | sha256sum | cut -d' ' -f1
)"
complete=1
for target in "${targets[@]}"; do
    [[ -x "$out/$target" && -x "$out/${target}_selftest" ]] || complete=0
done
if [[ $complete == 1 && -f "$out/.digest" && "$(cat "$out/.digest")" == "$digest" ]]; then
    echo "up to date: $out (digest $digest)"
    exit 0
fi
rm -f "$out/.digest"
for target in "${targets[@]}"; do rm -f "$out/$target" "$out/${target}_selftest"; done

# One line per binary: target, output name, extra flag (or -UGDP_FUZZ_SELFTEST).
jobs_list=()
for target in "${targets[@]}"; do
    jobs_list+=("$target $target -UGDP_FUZZ_SELFTEST" "$target ${target}_selftest -DGDP_FUZZ_SELFTEST")
done
build_one() {
    local target="$1" name="$2" define="$3" srcs libs=()
    case "$target" in
        fuzz_decode | fuzz_options) srcs=("${codec[@]}") ;;
        fuzz_auth) srcs=("${auth[@]}"); libs=(-lsodium) ;;
        *) srcs=("${pure[@]}") ;;
    esac
    # Written under a temporary name, renamed when complete: a killed build leaves no
    # binary that looks current.
    "$cc" "${flags[@]}" "$define" "$here/$target.c" "${srcs[@]}" "${libs[@]}" \
        -o "$out/.$name.tmp"
    mv -f "$out/.$name.tmp" "$out/$name"
    echo "built $out/$name"
}
max_jobs="${JOBS:-$(nproc)}"
for job in "${jobs_list[@]}"; do
    # shellcheck disable=SC2086
    build_one $job &
    while (($(jobs -rp | wc -l) >= max_jobs)); do wait -n || true; done
done
wait || true
# A binary exists only if its build succeeded (renamed into place at the end).
for job in "${jobs_list[@]}"; do
    read -r _ name _ <<<"$job"
    [[ -x "$out/$name" ]] || { echo "build.sh: building $name failed (see above)" >&2; exit 1; }
done
echo "$digest" >"$out/.digest"
