"""How artifact directories travel to executors under local and cluster masters."""

from __future__ import annotations

import tarfile

import pytest

from clinlinker_spark.spark import udfs


@pytest.mark.parametrize("master,single", [
    ("local", True), ("local[2]", True), ("local[*]", True), ("local[2,2]", True),
    ("local-cluster[1,2,2048]", False), ("yarn", False), ("k8s://https://h:6443", False),
    ("spark://h:7077", False),
])
def test_single_jvm_master(master, single):
    assert udfs._single_jvm_master(master) is single


class FakeContext:
    def __init__(self, master):
        self.master = master
        self.applicationId = f"app-{master}"
        self.files, self.archives = [], []

    def addFile(self, path, recursive=False):
        self.files.append((path, recursive))

    def addArchive(self, path):
        self.archives.append(path)


def test_cluster_masters_get_a_tar_with_the_files_at_its_root(tmp_path):
    art = tmp_path / "my-index"
    (art / "sub").mkdir(parents=True)
    (art / "manifest.json").write_text("{}")
    (art / "sub" / "x.bin").write_bytes(b"\x00\x01")
    sc = FakeContext("local-cluster[1,2,1024]")
    name = udfs.ship_artifact(sc, art, "h" * 64)
    assert name == "my-index" and sc.files == []
    [spec] = sc.archives
    path, alias = spec.split("#")
    assert alias == "my-index"
    with tarfile.open(path) as tar:
        assert sorted(tar.getnames()) == ["manifest.json", "sub", "sub/x.bin"]
    local = FakeContext("local[2]")
    assert udfs.ship_artifact(local, art, "h" * 64) == "my-index"
    assert local.files == [(str(art.resolve()), True)] and local.archives == []
