"""scripts/reproduce_tables.py: config selection, the paper's numbers, argument checks, table."""
import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("reproduce_tables", os.path.join(REPO, "scripts", "reproduce_tables.py"))
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)


def test_default_selection_is_every_paper_row_fp_first():
    names = rt.select_configs(None)
    assert set(names) == set(rt.paper_numbers())
    first_quant = next(i for i, n in enumerate(names) if not n.endswith("_fp"))
    assert all(n.endswith("_fp") for n in names[:first_quant])
    assert not any(n.endswith("_fp") for n in names[first_quant:])


def test_patterns_select_and_exclude_embedded():
    assert rt.select_configs(["deit_small_vtptq_w*"]) == ["deit_small_vtptq_w6a6", "deit_small_vtptq_w6a6_calib32",
                                                          "deit_small_vtptq_w8a8", "deit_small_vtptq_w8a8_calib32"]
    with pytest.raises(ValueError):
        rt.select_configs(["deit_fmnist_*"])


def test_find_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="deit_small_patch16_224"):
        rt.find_weights(str(tmp_path), "deit_small_patch16_224")
    (tmp_path / "deit_small_patch16_224.npz").write_bytes(b"")
    assert rt.find_weights(str(tmp_path), "deit_small_patch16_224").endswith(".npz")


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert rt.main([str(tmp_path / "missing"), str(tmp_path)]) == 2
    assert "data root not found" in capsys.readouterr().err
    assert rt.main([str(tmp_path), str(tmp_path), "--configs", "nothing_*"]) == 2


def test_missing_weights_are_a_row_not_a_crash(tmp_path):
    out = tmp_path / "out"
    assert rt.main([str(tmp_path), str(tmp_path), "--configs", "deit_small_fp", "--output", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert "| deit_small_fp | 79.80 |" in table and "no weights for deit_small_patch16_224" in table


def test_table_shows_measured_beside_paper():
    text = rt.table([{"config": "x", "paper": 75.0, "top1": 74.5, "fp_top1": 79.0, "model_size_mb": 21.0,
                      "calib_seconds": 12.0}])
    assert "| x | 75.00 | 74.50 | -0.50 | 79.00 | 21.00 | 12 |" in text
