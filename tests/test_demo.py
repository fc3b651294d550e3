"""``python -m mla_ref demo`` runs every section, the shipped teacher's included, and its checks hold."""

from mla_ref import __main__ as cli


def test_demo_runs_every_section_and_its_checks_pass(capsys):
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    for heading in (
        "== The GQA family",
        "== MLA: a latent cache",
        "== Real models",
        "== The GQA teacher, and the same model with MLA attention ==",
    ):
        assert heading in out
    assert "KV cache: 2 x 2 x 32 x 4 layers x 4 B = 2,048 B/token (fp32)" in out
    assert "exact MLA (d_c = d_R = 2 n_kv d_h): logits = teacher's within 1e-4, cache 2,048 B/token" in out
    assert "MLA at half the cache (method 'recipe', no training, d_R " in out
    assert out.rstrip().endswith("All checks in this demo passed.")
