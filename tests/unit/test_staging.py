"""The staging folder (`training.staging_dir`): config, where it resolves, and what training leaves there."""

from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]


def test_staging_dir_is_a_local_path_not_a_uri() -> None:
    from pydantic import ValidationError

    from tenantml.config import TrainingConfig

    assert TrainingConfig().staging_dir == ""
    assert TrainingConfig(staging_dir="/Volumes/main/ml/vol/tenantml/staging").staging_dir.startswith("/Volumes")
    assert TrainingConfig(staging_dir="${data_dir}/stage").staging_dir == "${data_dir}/stage"
    for bad in ("dbfs:/tmp/staging", "s3://bucket/staging", "file:/tmp/x", "a\x00b"):
        with pytest.raises(ValidationError, match="staging_dir"):
            TrainingConfig(staging_dir=bad)
    with pytest.raises(ValidationError):
        TrainingConfig(staging_folder="/x")  # type: ignore[call-arg]  # unknown keys are refused


def test_staging_dir_resolves_under_the_data_dir(tmp_path: Path) -> None:
    from tenantml.io.context import JobContext

    ctx = JobContext.create(conf_dir=REPO / "conf", data_dir=tmp_path / "data")
    assert ctx.staging_dir == tmp_path / "data" / "staging"
    for configured, expected in (("${data_dir}/s", tmp_path / "data" / "s"), ("rel/s", tmp_path / "data" / "rel/s"),
                                 ("/abs/s", Path("/abs/s"))):
        training = ctx.config.training.model_copy(update={"staging_dir": configured})
        other = JobContext(config=ctx.config.model_copy(update={"training": training}), data_dir=ctx.data_dir)
        assert other.staging_dir == expected


def test_a_giant_works_in_the_staging_folder_and_leaves_nothing(tmp_path: Path) -> None:
    from tenantml.core.errors import ConfigError
    from tenantml.training.giants import _workdir

    with _workdir("g1", tmp_path / "staging", local_mode=False) as work:
        assert work.parent == tmp_path / "staging" / "giants" and work.name.startswith("g1-")
        (work / "shard-0.parquet").write_bytes(b"x")
    assert not work.exists()
    with pytest.raises(RuntimeError), _workdir("g1", tmp_path / "staging", local_mode=False) as work:
        raise RuntimeError("training failed")
    assert list((tmp_path / "staging" / "giants").iterdir()) == []  # the tenant's rows never linger
    # Without a staging folder only local mode (processes on the driver) may use a driver temp folder.
    with _workdir("g1", None, local_mode=True) as work:
        assert str(work).startswith(tempfile.gettempdir())
    with pytest.raises(ConfigError, match=r"training\.staging_dir"), _workdir("g1", None, local_mode=False):
        pass


def test_local_mode_result_goes_beside_the_checkpoint_and_is_removed(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from tenantml.training import distributed
    from tenantml.training.distributed import SharedJob, launch

    seen: dict[str, Any] = {}

    def fake_launch(job: SharedJob, **_: Any) -> None:
        seen["result_path"] = job.result_path
        Path(str(job.result_path)).write_bytes(pickle.dumps({"model": b"m", "epochs_run": 1}))

    monkeypatch.setattr(distributed, "_launch", fake_launch)
    job = SharedJob(shard_files=(), spec={}, label="y", preprocessor={}, target_mean=0.0, target_std=1.0,
                    prior=None, params={}, steps_per_epoch=1, checkpoint_path=str(tmp_path / "ck" / "shared-x.pt"),
                    checkpoint_key="k", backend="ddp", use_gpu=False)
    assert launch(job, backend="torch_distributor", num_processes=2, local_mode=True)["epochs_run"] == 1
    assert Path(seen["result_path"]).parent == tmp_path / "ck"
    assert list((tmp_path / "ck").iterdir()) == []
    # Off local mode rank 0's task returns the result through Spark: no file at all.
    monkeypatch.setattr(distributed, "_launch", lambda job, **_: {"job_result_path": job.result_path})
    assert launch(job, backend="torch_distributor", num_processes=2, local_mode=False) == {"job_result_path": None}


def test_shard_export_manifest_and_local_paths(tmp_path: Path) -> None:
    from tenantml.training.distributed import _read_shard
    from tenantml.training.shared_data import EXPORT_MANIFEST, _export_manifest, _remove_stale_exports

    target = tmp_path / "v3-abc"
    (target / "_shard=0").mkdir(parents=True)
    pd.DataFrame({"tenant_id": ["t1", "t2"], "x": [1.0, 2.0]}).to_parquet(target / "_shard=0" / "a.parquet")
    (target / EXPORT_MANIFEST).write_text(json.dumps({"version": 3, "fingerprint": "abc", "num_shards": 2,
                                                      "shards": [["_shard=0/a.parquet"], []]}))
    shards = _export_manifest(target, version=3, fingerprint="abc", num_shards=2)
    assert shards == [[str(target / "_shard=0" / "a.parquet")], []]
    assert len(_read_shard(tuple(shards[0]))) == 2  # a plain local path, as torch processes get it
    assert _export_manifest(target, version=4, fingerprint="abc", num_shards=2) is None
    assert _export_manifest(target, version=3, fingerprint="abc", num_shards=3) is None
    (tmp_path / "v2-old").mkdir()
    (tmp_path / "v9-newer").mkdir()  # another run's newer version stays
    _remove_stale_exports(tmp_path, keep="v3-abc", version=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v3-abc", "v9-newer"]
    (target / "_shard=0" / "a.parquet").unlink()
    assert _export_manifest(target, version=3, fingerprint="abc", num_shards=2) is None  # a file is missing
