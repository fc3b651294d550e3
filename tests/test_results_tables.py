"""Reading the figures a benchmark wrote (mla_ref.results), on a small file of its own and on the shipped ones that
lesson 11 plots."""

import pytest

from mla_ref.results import perplexity_rows, read_tables, reproduce_command, results_file, sample_tables

SMALL = """# A results file

Reproduce: `python benchmarks/real_model.py --budgets 0.5 --methods recipe` (2 CPU threads).

| method | cache | code ppl | × source | prose ppl | × source | convert s |
|---|---:|---:|---:|---:|---:|---:|
| source | 100% | 9.000 | 1.00× | 18.000 | 1.00× | |
| recipe | 50.0% | 10.800 | 1.20× | 1,800.000 | 100.00× | 1,234 |

Prompt `def f(x):`:

| model | continuation |
|---|---|
| source | `'\\n    return x | 1\\n'` |
| recipe 50.0% | `"it's"` |
"""


def test_a_small_file_reads_back_as_written(tmp_path):
    path = tmp_path / "small.md"
    path.write_text(SMALL, encoding="utf-8")
    assert reproduce_command(path) == "python benchmarks/real_model.py --budgets 0.5 --methods recipe"
    tables = read_tables(path)
    assert [t["title"] for t in tables] == ["Reproduce: `python benchmarks/real_model.py --budgets 0.5 --methods recipe` "
                                            "(2 CPU threads).", "Prompt `def f(x):`:"]  # fmt: skip
    assert tables[0]["header"].count("× source") == 2  # a repeated column name keeps both columns
    assert perplexity_rows(path) == [
        {"method": "source", "fraction": 1.0, "code": 9.0, "prose": 18.0, "seconds": None},
        {"method": "recipe", "fraction": 0.5, "code": 10.8, "prose": 1800.0, "seconds": 1234.0},
    ]
    # a "|" inside a sample stays in it; the continuation is the text itself, not its repr
    assert sample_tables(path) == {"def f(x):": {"source": "\n    return x | 1\n", "recipe 50.0%": "it's"}}


def test_a_file_without_what_is_asked_is_refused_by_name(tmp_path):
    path = tmp_path / "bare.md"
    path.write_text("# nothing here\n\n| a | b |\n|---|---|\n| 1 | 2 |\n", encoding="utf-8")
    with pytest.raises(ValueError, match="names no command"):
        reproduce_command(path)
    with pytest.raises(ValueError, match="no table with columns 'method | cache"):
        perplexity_rows(path)
    assert sample_tables(path) == {}
    with pytest.raises(FileNotFoundError, match=r"no results file .*no_such\.md.*real_model_recipe\.md"):
        results_file("no_such.md")


@pytest.mark.parametrize("name", ["real_model_recipe.md", "real_model.md"])
def test_the_shipped_real_model_files_agree_with_themselves(name):
    """Each row's "× source" columns are its perplexities over the source row's, as the benchmark printed them (to
    the last printed digit: the ratio was taken before the perplexities were rounded)."""
    path = results_file(name)
    assert reproduce_command(path).startswith("python benchmarks/real_model.py ")
    table = next(t for t in read_tables(path) if t["header"][:2] == ["method", "cache"])
    ratio_columns = [i for i, name in enumerate(table["header"]) if name == "× source"]
    rows = perplexity_rows(path)
    source = rows[0]
    assert source["method"] == "source" and source["fraction"] == 1.0
    for cells, row in zip(table["rows"], rows, strict=True):
        printed = [float(cells[i].rstrip("×").replace(",", "")) for i in ratio_columns]
        assert printed == pytest.approx(
            [row["code"] / source["code"], row["prose"] / source["prose"]], rel=1e-3, abs=0.006
        )
    samples = sample_tables(path)
    assert {"def fibonacci(n):", "The Python language reference describes"} <= set(samples)
    assert all("source" in by_model for by_model in samples.values())


def test_the_two_files_measure_the_same_source_on_the_same_texts():
    recipe, others = (
        perplexity_rows(results_file("real_model_recipe.md")),
        perplexity_rows(results_file("real_model.md")),
    )
    assert recipe[0] == others[0]
    assert {r["fraction"] for r in recipe if r["method"] == "recipe"} == {0.5, 0.25, 0.125}
    assert {r["fraction"] for r in others if r["method"] == "transmla"} == {0.5, 0.25, 0.125}
