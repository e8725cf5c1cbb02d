"""The products benchmark runs end to end and its correctness gate holds."""
import json

from bench import products


def test_products_benchmark_runs_and_checks_every_method(tmp_path):
    status = products.main(["--models", "logreg", "--batch", "128", "--k", "4",
                            "--seconds", "0.05", "--rounds", "3", "--out", str(tmp_path)])
    assert status == 0
    result = json.loads((tmp_path / "products.json").read_text())
    rows = result["results"][0]["rows"]
    methods = {(r["product"], r["k"], r["method"]) for r in rows}
    assert ("ggn", 1, "torch.func") in methods and ("hessian", 4, "pyflat") in methods
    assert all(r["rel_error"] < products.CHECK_TOL for r in rows)
    assert all(r["ms_per_product"] > 0 and r["rounds"] >= 3 for r in rows)
    assert "| logreg | ggn | 1 | torch.func |" in (tmp_path / "products.md").read_text()


def test_spectral_benchmark_runs(tmp_path):
    from bench import spectral

    status = spectral.main(["--widths", "64", "16", "10", "--samples", "128", "--epochs", "20",
                            "--max-products", "150", "--out", str(tmp_path)])
    assert status == 0  # pyflat met every target
    rows = json.loads((tmp_path / "spectral.json").read_text())["rows"]
    assert [r["task"] for r in rows] == ["top-1 eigenvalues, residual 1e-6",
                                         "top-10 eigenvalues, residual 1e-6",
                                         "trace to 1% standard error"]
    top1 = rows[0]
    if top1["baseline_converged"]:
        assert top1["max_rel_difference"] < 1e-5


def test_dataset_benchmark_runs(tmp_path):
    from bench import dataset

    assert dataset.main(["--synthetic-samples", "600", "--digits-samples", "500",
                         "--batch", "256", "--max-products", "40",
                         "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "dataset.json").read_text())["rows"]
    assert [r["cached_batches"] for r in rows] == [2, 0, 3, 0]
    # cache on or off, the numbers are the same
    assert rows[0]["top_eigenvalue"] == rows[1]["top_eigenvalue"]
    assert rows[2]["trace"] == rows[3]["trace"]


def test_convnet_benchmark_runs_and_checks_every_method(tmp_path):
    from bench import convnets

    assert convnets.main(["--models", "cnn", "resnet8", "--batch", "8", "--k", "2",
                          "--seconds", "0.01", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "convnets.json").read_text())
    assert [r["model"] for r in result["results"]] == ["cnn", "resnet8"]
    for res in result["results"]:
        assert all(r["rel_error"] < convnets.CHECK_TOL for r in res["rows"])
        assert {("ggn", 1, "pyflat"), ("hessian", 2, "torch.func")} <= {
            (r["product"], r["k"], r["method"]) for r in res["rows"]}
    assert "| resnet8 | ggn | 1 | torch.func |" in (tmp_path / "convnets.md").read_text()


def test_blocks_benchmark_runs_both_allocators(tmp_path):
    from bench import blocks

    assert blocks.main(["--models", "logreg", "--rounds", "3", "--batch", "64",
                        "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "blocks.json").read_text())
    for setting in ("default", "tuned"):
        rows = result["runs"][setting]
        assert [(r["product"], r["k"]) for r in rows] == [
            (p, k) for p in ("GGN", "Hessian") for k in (1, 4, 16)]
        assert all(r["ms_per_direction"] > 0 and r["faults_per_call"] >= 0 for r in rows)
    assert "| logistic regression 64-10 | GGN | 16 |" in (tmp_path / "blocks.md").read_text()
