#!/usr/bin/env bash
# Builds an Arbiter image FROM scratch out of a binary already built on this
# machine and the shared libraries it links (as `ldd` lists them), pulling
# nothing: for machines without registry access, where deploy/Dockerfile
# cannot fetch its base images. Needs podman (or buildah) and root.
#
#   deploy/build-scratch-image.sh target/image/arbiter localhost/arbiter:scratch
#
# The image matches deploy/Dockerfile's runtime stage: /usr/local/bin/arbiter,
# user 65532:65532, entrypoint `arbiter`, command `serve`, CA certificates.
set -euo pipefail
binary=${1:?usage: $0 BINARY TAG}
tag=${2:?usage: $0 BINARY TAG}
builder=podman
command -v podman >/dev/null 2>&1 || builder=buildah

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
root=$context/rootfs
install -D -m 0755 "$binary" "$root/usr/local/bin/arbiter"
# Every library the dynamic loader resolves, at the same path, plus the
# loader itself (the line without `=>`).
ldd "$binary" | awk '/=> \//{print $3} /^\s*\/[^ ]+ \(/{print $1}' | while read -r lib; do
  install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
done
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
  install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
fi
mkdir -p "$root/etc" "$root/tmp"
chmod 1777 "$root/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
cat >"$context/Containerfile" <<'CONTAINERFILE'
FROM scratch
COPY rootfs/ /
USER 65532:65532
EXPOSE 50051 9464
ENTRYPOINT ["/usr/local/bin/arbiter"]
CMD ["serve"]
CONTAINERFILE
if [[ $builder == podman ]]; then
  podman build --quiet --pull=never -t "$tag" -f "$context/Containerfile" "$context"
else
  buildah bud --quiet --pull-never -t "$tag" -f "$context/Containerfile" "$context"
fi
