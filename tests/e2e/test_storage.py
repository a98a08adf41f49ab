"""--storage: Tune's part of an experiment on storage every node shares, read back through pyarrow.fs.

Tested with a `file://` URI on a two-node cluster on this machine (Ray's own test utility,
two nodes of one CPU each, so two concurrent trials run on different nodes).
"""
from __future__ import annotations

import pytest

from search.tuning.storage import experiment_root, resolve, tune_location, tune_started
from tests.helpers import read_table, run_command


def test_locations_for_a_uri_and_a_plain_path(tmp_path):
    exp = tmp_path / "results" / "x"
    assert experiment_root(exp) == str(exp.resolve())
    assert tune_location(exp, "s3://bucket/fer") == "s3://bucket/fer/x/tune"
    assert tune_location(exp, f"file://{tmp_path}/store") == f"file://{tmp_path}/store/x/tune"
    assert tune_location(exp, str(tmp_path / "nfs")) == f"{tmp_path}/nfs/x/tune"
    assert not tune_started(exp, f"file://{tmp_path}/store")
    fs, path = resolve(f"file://{tmp_path}/store")
    assert type(fs).__name__ == "LocalFileSystem" and path == f"{tmp_path}/store"


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster.address
    cluster.shutdown()


@pytest.mark.slow
def test_search_resume_and_final_stage_through_a_file_uri_on_two_nodes(two_nodes, tmp_path):
    store = f"file://{tmp_path}/shared"
    results = tmp_path / "results"
    flags = ["--space", "convnet", "--data", "demo", "--num-samples", "2", "--max-epochs", "1", "--grace-epochs", "1",
             "--train-fraction", "0.3", "--no-known-good", "--storage", store, "--results", str(results),
             "--name", "st", "--address", two_nodes, "--no-final"]
    r = run_command("search.run", *flags)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "shared" / "st" / "tune").is_dir() and not (results / "st" / "tune").exists()
    # The report reads the trials' per-epoch results through the URI.
    assert "not written" not in r.stderr and (results / "st" / "figures" / "learning_curves.png").is_file()
    df = read_table(results / "st" / "trials.csv")
    assert len(df) == 2 and (df["status"] == "COMPLETED").all()
    assert df["node_id"].nunique() == 2  # one trial per node: both wrote to the shared storage
    assert all((tmp_path / "shared" / "st" / "tune" / f"trial_{t}" / "result.json").is_file() for t in df["trial_id"])

    r = run_command("search.run", *flags, "--resume", "--no-report")  # reads the experiment back from the URI
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert read_table(results / "st" / "trials.csv")[["trial_id", "objective"]].equals(df[["trial_id", "objective"]])

    r = run_command("search.final", str(results / "st"), "--final-top-k", "1", "--final-seeds", "1",
                    "--final-epochs", "1", "--final-tta", "none", "--no-report")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = read_table(results / "st" / "final" / "metrics.csv")
    assert metrics["config"].iloc[0] == f"top1-{df['trial_id'].iloc[0]}"

    r = run_command("search.run", *[f for f in flags if f != "--no-final"], "--results", str(tmp_path / "other"))
    assert r.returncode == 2 and "already holds a search" in r.stderr  # the URI's experiment is never overwritten
