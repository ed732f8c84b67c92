"""dft-plan: preset parameter counts against the published model sizes, ZeRO sharding arithmetic,
and the largest micro batch it reports actually fits its own budget while one more does not."""

import pytest

from dft_ds.memory import GIB, count_parameters, estimate_memory
from dft_ds.plan import PRESETS, RESERVE_GIB, load_config, main, plan


# Billions of parameters of each preset's published model (its model card), tied weights counted once.
PUBLISHED = {"qwen2.5-math-1.5b": 1.54, "qwen2.5-math-7b": 7.62, "llama-3.2-3b": 3.21, "llama-3.1-8b": 8.03,
             "deepseek-math-7b": 6.91}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_sizes_match_the_published_models(name):
    assert count_parameters(load_config(name)) / 1e9 == pytest.approx(PUBLISHED[name], abs=0.01)


def test_every_preset_is_tested():
    assert sorted(PRESETS) == sorted(PUBLISHED)


def test_largest_micro_batch_fits_and_one_more_does_not():
    config = load_config("llama-3.1-8b")
    n = count_parameters(config)
    for row in plan(config, 8, 80.0, 2048):
        if not row.max_micro_batch:
            continue
        stage = 2 if row.strategy == "ZeRO-2" else 3
        offload = "offload" in row.strategy

        def total(micro):
            return estimate_memory(n, config, stage, 8, "bf16", micro * 2048, row.checkpointing, row.fused, 128,
                                   offload).total / GIB
        assert total(row.max_micro_batch) <= 80.0 - RESERVE_GIB
        assert total(row.max_micro_batch + 1) > 80.0 - RESERVE_GIB


def test_zero2_without_room_for_the_weights_does_not_fit():
    rows = plan(load_config("llama-3.1-8b"), 2, 24.0, 2048)
    zero2 = [r for r in rows if r.strategy == "ZeRO-2"]
    assert all(r.max_micro_batch == 0 for r in zero2)  # 16 GB of bf16 weights + states on a 24 GiB card
    assert any(r.max_micro_batch > 0 for r in rows if r.strategy == "ZeRO-3 + offload")


def test_cli_prints_a_table_and_refuses_an_unknown_model(capsys, tmp_path):
    assert main(["--model", "qwen2.5-math-1.5b", "--gpus-per-node", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "1.54B parameters" in out and "| ZeRO-3 + offload | on | fused |" in out
    assert main(["--model", str(tmp_path / "nope")]) == 2
    assert "not a preset" in capsys.readouterr().err
