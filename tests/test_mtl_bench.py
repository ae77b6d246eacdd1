"""The benchmark script runs every architecture in both precision modes (tiny CPU settings)."""
import json

from downstream.bench_mtl import main


def test_bench_mtl_tiny(tmp_path):
    out = tmp_path / "bench.json"
    results = main(["--backbone", "resnet_tiny", "--narrow", "--height", "32", "--width", "48", "--batch-size", "2",
                    "--steps", "1", "--warmup", "0", "--device", "cpu", "--output", str(out)])
    assert {(r["arch"], r["mode"]) for r in results} == {(a, m) for a in ("mtl_baseline", "pad_net", "mti_net")
                                                         for m in ("fp32", "bf16+channels_last")}
    assert all(r["img_per_s"] > 0 for r in results)
    assert len(json.loads(out.read_text())["results"]) == 6
