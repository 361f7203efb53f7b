#!/usr/bin/env bash
# Build kube-apiserver v1.20.2 from Debian's `kubernetes` source package with Debian's Go, into
# the cache directory given as $1 (outside the repository), unless it is already there.
# Recipe and reasons: ../shared/KUBERNETES.md of the workplace; summarised in ARCHITECTURE.md.
# Needs: golang-go etcd-server golang-github-modern-go-reflect2-dev (installed by .ci/run).
set -euo pipefail
cache=${1:?usage: build-apiserver.sh CACHE_DIR}
bin="$cache/kube-apiserver"
if [[ -x "$bin" ]] && "$bin" --version >/dev/null 2>&1; then
    echo "kube-apiserver: reusing $bin"
    exit 0
fi
mkdir -p "$cache"
work="$cache/build"
rm -rf "$work"
mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial" "$work/apt/parts"
# The machine's apt sources carry no deb-src lines: a private apt setup reads the same mirrors
# for sources without touching the system's configuration.
for f in /etc/apt/sources.list.d/*.sources; do
    [[ -e "$f" ]] || continue
    sed 's/^Types: *deb$/Types: deb-src/' "$f" >"$work/apt/parts/$(basename "$f")"
done
if [[ -s /etc/apt/sources.list ]]; then
    sed -n 's/^deb /deb-src /p' /etc/apt/sources.list >"$work/apt/parts/main.list"
fi
apt_opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/apt/parts"
    -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache"
    -o Debug::NoLocking=1)
apt-get "${apt_opts[@]}" update -q
(cd "$work" && apt-get "${apt_opts[@]}" source --download-only kubernetes)
tarball=$(ls "$work"/kubernetes_*.orig.tar.gz | head -n1)
mkdir -p "$work/src"
tar -xzf "$tarball" -C "$work/src" --strip-components=1
cd "$work/src"
# reflect2 v1.0.1 (vendored) breaks with Go >= 1.18; Debian's packaged copy works.
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
mkdir -p .go/src/k8s.io
ln -sfn ../../.. .go/src/k8s.io/kubernetes
export GOPATH="$work/src/.go" CGO_ENABLED=0 GOCACHE="$cache/gocache"
# The tree's own build: it generates the OpenAPI definitions the tarball lacks, then builds
# the one command (no cross builds).
make WHAT=cmd/kube-apiserver
cp _output/bin/kube-apiserver "$work/kube-apiserver"
mv "$work/kube-apiserver" "$bin"
"$bin" --version
rm -rf "$work"
echo "kube-apiserver: built $bin"
