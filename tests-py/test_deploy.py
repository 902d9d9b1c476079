"""The container images' recipes, where `make test-images` cannot reach: it builds and runs the
images' `from-host` target from local bases (no registry here), so the `from-source` build stage
(the upstream Rust image) and the default base images are checked as a reviewer would: the
workspace's CPU baseline and toolchain, every crate copied in, distroless (or CUDA runtime)
bases, and the names `make images` and the chart agree on."""

from __future__ import annotations

import re

import pytest
import yaml

from helm_render import CHART, REPO

DEPLOY = REPO / "deploy"
IMAGES = {
    "operator.Dockerfile": ("sluice-operator", "cargo build --release --locked -p sluice-operator"),
    "sidecar.Dockerfile": ("sluice-sidecar", "cargo build --release --locked -p sluice-sidecar"),
    "sidecar-cuda.Dockerfile": (
        "sluice-sidecar", "cargo build --release --locked -p sluice-sidecar --features cuda"),
}


def stages(text: str) -> list[str]:
    return re.findall(r"^FROM\s+(\S+)", text, re.M)


@pytest.mark.parametrize("name", IMAGES)
def test_dockerfile_builds_from_source_by_default_and_from_host_on_request(name):
    text = (DEPLOY / name).read_text()
    binary, build = IMAGES[name]
    assert stages(text) == ["${BUILD_IMAGE}", "${RUNTIME_IMAGE}", "runtime", "runtime"]
    names = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M)
    assert names == ["build", "runtime", "from-host", "from-source"]  # the last is the default
    assert build in " ".join(text.split())
    assert "COPY .cargo ./.cargo" in text  # x86-64-v3 RUSTFLAGS from .cargo/config.toml
    assert "COPY rust-toolchain.toml Cargo.toml Cargo.lock ./" in text
    from_host = text[text.index("AS from-host"):text.index("AS from-source")]
    assert f"COPY bin/{binary} /usr/local/bin/{binary}" in from_host
    from_source = text[text.index("AS from-source"):]
    assert f"COPY --from=build /out/{binary} /usr/local/bin/{binary}" in from_source


def test_default_bases_are_distroless_and_cuda():
    for name in ("operator.Dockerfile", "sidecar.Dockerfile"):
        text = (DEPLOY / name).read_text()
        assert "ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot" in text
        assert "ARG BUILD_IMAGE=docker.io/library/rust:${RUST_VERSION}-bookworm" in text
    cuda = (DEPLOY / "sidecar-cuda.Dockerfile").read_text()
    assert re.search(r"^ARG BUILD_IMAGE=\S+-devel-", cuda, re.M)
    assert re.search(r"^ARG RUNTIME_IMAGE=\S+-runtime-", cuda, re.M)


def test_rust_version_matches_the_pinned_toolchain():
    toolchain = re.search(r'channel = "([^"]+)"', (REPO / "rust-toolchain.toml").read_text())[1]
    for name in IMAGES:
        assert f"ARG RUST_VERSION={toolchain}" in (DEPLOY / name).read_text(), name


def test_make_images_builds_what_the_chart_deploys():
    makefile = (REPO / "Makefile").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    registry = re.search(r"^IMAGE_REGISTRY \?= (\S+)", makefile, re.M)[1]
    for dockerfile, repo in [("operator", values["image"]["repository"]),
                             ("sidecar", values["sidecar"]["image"]["repository"]),
                             ("sidecar-cuda", values["sidecar"]["cudaImage"]["repository"])]:
        name = repo.removeprefix(registry + "/")
        assert repo == f"{registry}/{name}"
        assert re.search(rf"-f deploy/{dockerfile}\.Dockerfile -t \$\(IMAGE_REGISTRY\)/{name}:",
                         makefile), dockerfile


def workspace_paths() -> set[str]:
    """The directories cargo needs to read the workspace: its members and the patched crates."""
    import tomllib

    manifest = tomllib.loads((REPO / "Cargo.toml").read_text())
    paths = set(manifest["workspace"]["members"])
    for crates in manifest.get("patch", {}).values():
        paths |= {spec["path"].split("/")[0] for spec in crates.values() if "path" in spec}
    return paths


@pytest.mark.parametrize("name", IMAGES)
def test_build_stage_gets_every_crate_the_workspace_names(name):
    # cargo refuses to build a workspace whose members or [patch] paths are missing, so an image
    # build would fail at `cargo build` without them.
    text = (DEPLOY / name).read_text()
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for path in sorted(workspace_paths()):
        assert f"COPY {path} ./{path}" in text, f"{name} does not copy {path}/"
        assert path not in ignored, f".dockerignore leaves {path}/ out of the build context"
