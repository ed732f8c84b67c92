"""Reading back what the trackers wrote, offline: W&B's .wandb transaction log (decoded with W&B's own
protobuf schema) and MLflow's store (with MlflowClient)."""

import glob
import json
import os
import struct


def wandb_records(path: str):
    """The records of one .wandb file: a LevelDB-style log (a 7-byte ':W&B' header, 32 KiB blocks,
    each record a 7-byte header of crc32c, length and kind, FULL=1 or FIRST/MIDDLE/LAST=2/3/4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as fh:
        data = fh.read()
    assert data[:4] == b":W&B", path
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # too small for a header: zero padding to the next block
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_runs(output_dir) -> list[str]:
    """The offline run directories under output_dir/wandb, oldest first."""
    return sorted(glob.glob(os.path.join(str(output_dir), "wandb", "offline-run-*")))


def wandb_file(run_dir: str) -> str:
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    return path


def _items(items) -> dict:
    """W&B's items: a key, or nested keys (a histogram is {"_type", "bins", "values"} under its tag)."""
    out = {}
    for item in items:
        keys = [item.key] if item.key else list(item.nested_key)
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = json.loads(item.value_json)
    return out


def wandb_history(run_dir: str) -> dict[int, dict]:
    """step -> {key: value} of the run's logged rows (W&B's own _step, _runtime, ... left out)."""
    rows = {}
    for record in wandb_records(wandb_file(run_dir)):
        if record.WhichOneof("record_type") == "history":
            row = _items(record.history.item)
            rows.setdefault(row["_step"], {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    return rows


def wandb_run_info(run_dir: str) -> dict:
    """{"id", "project", "name", "config": {key: value}} from the run and config records."""
    info = {"config": {}}
    for record in wandb_records(wandb_file(run_dir)):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info.update(id=record.run.run_id, project=record.run.project, name=record.run.display_name)
            items = record.run.config.update
        elif kind == "config":
            items = record.config.update
        else:
            continue
        info["config"].update(_items(items))
    return info


def mlflow_client(output_dir):
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=Path(output_dir, "mlruns").resolve().as_uri())


def mlflow_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
