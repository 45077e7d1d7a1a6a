"""The corpus reader: every source kind, columns and ids, shard and limit, memory, errors."""
from __future__ import annotations

import importlib
import json
import os
import sys
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tokenprobe.corpus_files as corpus_module
from tokenprobe.corpus import Corpus, CorpusError, Prompt, parse_shard
from tokenprobe.tokens import PromptError


def texts(corpus: Corpus) -> list[str]:
    return [p.text for p in corpus]


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def write_parquet(path: Path, columns: dict, row_group_size: int | None = None) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def hf_dataset(tmp_path_factory) -> Path:
    """A real `datasets.save_to_disk` folder of 10 rows in 3 Arrow files, and a DatasetDict
    beside it. Requires `datasets` (a dev dependency): an ImportError here is a failure."""
    import datasets

    root = tmp_path_factory.mktemp("hf")
    rows = {"text": [f"row {i}" for i in range(10)], "id": [100 + i for i in range(10)],
            "label": list(range(10))}
    data = datasets.Dataset.from_dict(rows)
    data.save_to_disk(str(root / "one"), num_shards=3)
    datasets.DatasetDict({"train": data, "test": data.select(range(2))}).save_to_disk(
        str(root / "dict"))
    return root


# --- each kind of source ---------------------------------------------------------------------

def test_txt_is_one_prompt_per_non_blank_line(tmp_path):
    path = write(tmp_path / "p.txt", "\ufefffirst\n\n   \nsecond  \r\nthird")
    prompts = list(Corpus([path]))
    assert prompts == [Prompt(0, "first", None), Prompt(1, "second  ", None),
                       Prompt(2, "third", None)]


def test_jsonl_strings_and_objects_with_text_prompt_and_id(tmp_path):
    path = write(tmp_path / "p.jsonl", "\n".join([
        '"plain"', '{"text": "t", "id": 7}', '', '{"prompt": "p", "id": "x"}',
        '{"text": "no id"}', '{"text": "float id", "id": 1.5}']))
    assert [(p.prompt_id, p.text, p.doc_id) for p in Corpus([path])] == [
        (0, "plain", None), (1, "t", "7"), (2, "p", "x"), (3, "no id", None),
        (4, "float id", "1.5")]


def test_jsonl_named_columns(tmp_path):
    path = write(tmp_path / "p.jsonl", '{"body": "b1", "text": "t", "key": 1}\n'
                                       '{"body": "b2", "key": 2}\n')
    prompts = list(Corpus([path], text_column="body", id_column="key"))
    assert [(p.text, p.doc_id) for p in prompts] == [("b1", "1"), ("b2", "2")]


def test_csv_header_columns_ids_and_quoted_newlines(tmp_path):
    path = write(tmp_path / "p.csv", 'id,text,other\n1,"hello, world",x\n\n'
                                     ',"two\nlines",y\n3,plain,z\n')
    prompts = list(Corpus([path]))
    assert [(p.text, p.doc_id) for p in prompts] == [
        ("hello, world", "1"), ("two\nlines", None), ("plain", "3")]
    path2 = write(tmp_path / "q.csv", "prompt,n\nfirst,1\n")
    assert texts(Corpus([path2])) == ["first"]
    assert [p.doc_id for p in Corpus([path2], text_column="prompt", id_column="n")] == ["1"]


def test_parquet_in_batches_with_ids(tmp_path):
    n = corpus_module.BATCH_ROWS * 2 + 5
    path = write_parquet(tmp_path / "p.parquet",
                         {"id": list(range(n)), "text": [f"t{i}" for i in range(n)],
                          "extra": [0.5] * n}, row_group_size=700)
    prompts = list(Corpus([path]))
    assert [p.text for p in prompts] == [f"t{i}" for i in range(n)]
    assert [p.doc_id for p in prompts] == [str(i) for i in range(n)]
    assert [p.prompt_id for p in prompts] == list(range(n))
    named = write_parquet(tmp_path / "q.parquet", {"body": ["a", "b"], "prompt": ["x", "y"]})
    assert texts(Corpus([named])) == ["x", "y"]
    assert texts(Corpus([named], text_column="body")) == ["a", "b"]


def expected_dataset_rows() -> list[tuple[int, str, str]]:
    return [(i, f"row {i}", str(100 + i)) for i in range(10)]


def test_datasets_folder_through_datasets(hf_dataset):
    assert (hf_dataset / "one" / "state.json").is_file()
    assert len(list((hf_dataset / "one").glob("*.arrow"))) == 3
    prompts = list(Corpus([hf_dataset / "one"]))
    assert [(p.prompt_id, p.text, p.doc_id) for p in prompts] == expected_dataset_rows()


def test_datasets_folder_without_datasets_reads_the_arrow_files(hf_dataset, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(ImportError):
        importlib.import_module("datasets")
    prompts = list(Corpus([hf_dataset / "one"]))
    assert [(p.prompt_id, p.text, p.doc_id) for p in prompts] == expected_dataset_rows()
    with pytest.raises(CorpusError, match=r'has no "body" column \(its columns: text, id, label'):
        list(Corpus([hf_dataset / "one"], text_column="body"))


def test_dataset_dict_asks_for_a_split(hf_dataset):
    with pytest.raises(CorpusError, match=r"DatasetDict \(splits: test, train\); point at one "
                                          r"split, DIR/<split>"):
        list(Corpus([hf_dataset / "dict"]))
    assert texts(Corpus([hf_dataset / "dict" / "test"])) == ["row 0", "row 1"]


def test_dataset_columns_and_null_text(hf_dataset, tmp_path, monkeypatch):
    import datasets

    assert [p.doc_id for p in Corpus([hf_dataset / "one"], id_column="label")][:2] == ["0", "1"]
    with pytest.raises(CorpusError, match=r'has no "key" id column \(its columns: text, id'):
        list(Corpus([hf_dataset / "one"], id_column="key"))
    datasets.Dataset.from_dict({"text": ["a", "b", "c", None]}).save_to_disk(
        str(tmp_path / "nulls"), num_shards=2)
    with pytest.raises(CorpusError, match=r'nulls record 4: the "text" value is null, not text'):
        list(Corpus([tmp_path / "nulls"]))
    with monkeypatch.context() as patch:  # the pyarrow reader numbers records across files too
        patch.setitem(sys.modules, "datasets", None)
        with pytest.raises(CorpusError, match=r'nulls record 4: the "text" value is null'):
            list(Corpus([tmp_path / "nulls"]))


def test_directory_reads_its_prompt_files_sorted_not_recursively(tmp_path):
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    write(folder / "b.txt", "from b\n")
    write(folder / "a.jsonl", '"from a"\n')
    write(folder / "c.csv", "text\nfrom c\n")
    write_parquet(folder / "d.parquet", {"text": ["from d"]})
    write(folder / "notes.md", "ignored\n")
    write(folder / ".hidden.txt", b"\xff\xfe")  # e.g. a macOS ._ file: ignored
    write(folder / "sub" / "deep.txt", "not read\n")
    assert texts(Corpus([folder])) == ["from a", "from b", "from c", "from d"]
    names = [f"{i:02d}-{(7 * i) % 20}.txt" for i in (5, 12, 0, 19, 3, 8, 15, 1, 10, 17, 6)]
    for name in names:  # created out of order: only sorting gives sorted names
        write(folder / "sub" / name, name + "\n")
    assert texts(Corpus([folder / "sub"])) == sorted(names) + ["not read"]  # deep.txt last
    other = tmp_path / "other"
    other.mkdir()
    write(other / "readme.md", "x")
    with pytest.raises(CorpusError, match=r"directory .*other holds no \.txt, \.jsonl, \.csv, "
                                          r"\.parquet files \(subfolders are not read\)"):
        list(Corpus([other]))


def test_glob_matches_sorted_and_no_match(tmp_path):
    for name in ["b.txt", "a.txt", "c.jsonl"]:
        write(tmp_path / name, json.dumps(name) + "\n" if name.endswith("l") else name + "\n")
    assert texts(Corpus([str(tmp_path / "*.txt")])) == ["a.txt", "b.txt"]
    names = [f"g{(7 * i) % 13:02d}.txt" for i in range(13)]  # created out of order
    for name in names:
        write(tmp_path / name, name + "\n")
    assert texts(Corpus([str(tmp_path / "g*.txt")])) == sorted(names)
    assert texts(Corpus([str(tmp_path / "[bc].*")])) == ["b.txt", "c.jsonl"]
    with pytest.raises(CorpusError, match=r"no file matches the pattern .*\*\.csv"):
        list(Corpus([str(tmp_path / "*.csv")]))
    literal = write(tmp_path / "lit[1].txt", "literal\n")  # an existing name is not a pattern
    assert texts(Corpus([str(literal)])) == ["literal"]


def test_texts_come_first_then_each_source_in_order(tmp_path):
    a = write(tmp_path / "a.txt", "a1\na2\n")
    b = write(tmp_path / "b.jsonl", '{"text": "b1", "id": "x"}\n')
    prompts = list(Corpus([b, a], texts=["t0", "t1"]))
    assert [(p.prompt_id, p.text, p.doc_id) for p in prompts] == [
        (0, "t0", None), (1, "t1", None), (2, "b1", "x"), (3, "a1", None), (4, "a2", None)]


def test_iterating_twice_gives_the_same_prompts(tmp_path):
    corpus = Corpus([write(tmp_path / "a.txt", "x\ny\nz\n")], texts=["t"], shard=(1, 2))
    assert list(corpus) == list(corpus) == [Prompt(1, "x", None), Prompt(3, "z", None)]


# --- shard and limit -------------------------------------------------------------------------

def test_shards_partition_the_corpus_deterministically(tmp_path):
    path = write(tmp_path / "p.txt", "".join(f"line {i}\n" for i in range(23)))
    whole = list(Corpus([path], texts=["t"]))
    assert len(whole) == 24
    for n in (1, 2, 3, 5, 24):
        shards = [list(Corpus([path], texts=["t"], shard=(i, n))) for i in range(n)]
        assert shards == [list(Corpus([path], texts=["t"], shard=(i, n))) for i in range(n)]
        ids = [p.prompt_id for shard in shards for p in shard]
        assert sorted(ids) == list(range(24)) and len(set(ids)) == 24  # disjoint, whole
        assert sorted((p for s in shards for p in s), key=lambda p: p.prompt_id) == whole
        assert all(p.prompt_id % n == i for i, s in enumerate(shards) for p in s)


def test_limit_keeps_the_first_prompts_after_sharding(tmp_path):
    path = write(tmp_path / "p.txt", "".join(f"{i}\n" for i in range(20)))
    assert [p.prompt_id for p in Corpus([path], limit=3)] == [0, 1, 2]
    assert [p.prompt_id for p in Corpus([path], shard=(1, 3), limit=2)] == [1, 4]
    assert [p.prompt_id for p in Corpus([path], limit=100)] == list(range(20))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="limit must be a positive integer"):
            Corpus([path], limit=bad)


def test_limit_stops_reading_the_sources(tmp_path, monkeypatch):
    good = "".join(f"line {i}\n" for i in range(5))
    path = write(tmp_path / "p.txt", good.encode() + b"\xff bad tail\n")
    later = write(tmp_path / "later.jsonl", "not json\n")
    assert texts(Corpus([path, later], limit=5)) == [f"line {i}" for i in range(5)]
    with pytest.raises(CorpusError, match="not UTF-8"):
        list(Corpus([path, later]))
    assert len(list(Corpus([path, later], shard=(1, 2), limit=2))) == 2  # ids 1, 3
    read = []
    real = corpus_module._lines

    def counting(file):
        for item in real(file):
            read.append(item)
            yield item

    monkeypatch.setattr(corpus_module, "_lines", counting)
    big = write(tmp_path / "big.txt", "".join(f"{i}\n" for i in range(10_000)))
    assert len(list(Corpus([big], limit=3))) == 3
    assert len(read) == 3


def test_parse_shard():
    assert parse_shard("0/4") == (0, 4)
    assert parse_shard(" 3 / 4 ") == (3, 4)
    for bad in ["4/4", "1/0", "-1/4", "a/b", "1", "1/2/3", "", "1.0/2"]:
        with pytest.raises(ValueError, match=r"a shard is I/N with 0 <= I < N .*got "):
            parse_shard(bad)
    for bad in [(2, 2), (0, 0), (-1, 3), (0,), "0/2", (0.0, 2)]:
        with pytest.raises(ValueError, match="a shard is I/N"):
            Corpus(texts=["x"], shard=bad)


def test_a_shard_that_keeps_nothing(tmp_path):
    with pytest.raises(CorpusError, match=r"shard 3/4 keeps none of the corpus's 2 prompts"):
        list(Corpus(texts=["a", "b"], shard=(3, 4)))


# --- bounded memory --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv", "parquet"])
def test_memory_stays_bounded_on_a_large_file(tmp_path, kind):
    line, rows = "x" * 999, {"txt": 40_000, "jsonl": 20_000, "csv": 20_000, "parquet": 20_000}[kind]
    path = tmp_path / f"big.{kind}"
    if kind == "parquet":
        write_parquet(path, {"text": [f"{i} {line}" for i in range(rows)]}, row_group_size=2000)
    else:
        body = {"txt": f"{line}\n", "jsonl": json.dumps({"text": line}) + "\n",
                "csv": f"{line}\n"}[kind]
        with open(path, "w") as f:
            f.write("text\n" if kind == "csv" else "")
            for _ in range(rows):
                f.write(body)
    total = rows * len(line)  # the text the corpus holds (a Parquet file is compressed)
    tracemalloc.start()
    try:
        count = sum(1 for _ in Corpus([path]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == rows
    ratio = 8 if kind == "parquet" else 100  # a Parquet batch is BATCH_ROWS texts at once
    assert peak < total / ratio, f"peak {peak} bytes reading {total} bytes of text"


# --- errors ----------------------------------------------------------------------------------

def test_no_prompts_given():
    with pytest.raises(ValueError, match="no prompts given"):
        Corpus()
    with pytest.raises(TypeError, match="wrap a single one in a list"):
        Corpus("prompts.txt")
    with pytest.raises(TypeError, match="each source is a path"):
        Corpus([3])
    with pytest.raises(TypeError, match="each text a str"):
        Corpus(texts=[None])


def test_sources_that_hold_nothing(tmp_path):
    empty = write(tmp_path / "empty.txt", "\n  \n")
    blank = write(tmp_path / "blank.csv", "text\n")
    with pytest.raises(CorpusError, match=r"the sources hold no prompts: .*empty\.txt, "
                                          r".*blank\.csv"):
        list(Corpus([empty, blank]))
    with pytest.raises(CorpusError, match="hold no prompts"):
        Corpus([empty]).check()


def test_missing_path_and_unknown_suffix(tmp_path):
    with pytest.raises(CorpusError, match=r"prompt source .*nope\.txt does not exist"):
        list(Corpus([tmp_path / "nope.txt"]))
    doc = write(tmp_path / "notes.md", "x\n")
    with pytest.raises(CorpusError, match=r"notes\.md: .*accepted: \.txt, \.jsonl, \.csv, "
                                          r"\.parquet"):
        list(Corpus([doc]))


def test_nothing_is_read_before_iteration_and_check_fails_early(tmp_path):
    corpus = Corpus([tmp_path / "nope.txt"])
    iterator = iter(corpus)  # a generator: nothing resolved yet
    with pytest.raises(CorpusError, match="does not exist"):
        next(iterator)
    with pytest.raises(CorpusError, match="does not exist"):
        corpus.check()
    bad_column = write(tmp_path / "c.csv", "body\nx\n")
    with pytest.raises(CorpusError, match=r'c\.csv has no "text" or "prompt" or "messages" column \(its '
                                          r"columns: body\)"):
        Corpus([bad_column]).check()
    with pytest.raises(PromptError, match=r"prompt 1 \(texts\[1\]\)"):
        Corpus(texts=["ok", " "]).check()
    late = write(tmp_path / "late.txt", b"fine\n" + b"\xff\n")  # check reads the first record
    Corpus([late], texts=["t"]).check()
    with pytest.raises(CorpusError):
        list(Corpus([late]))


def test_empty_prompts_name_the_source_record_and_prompt_id(tmp_path):
    with pytest.raises(PromptError, match=r"prompt 1 \(texts\[1\]\) is empty or whitespace "
                                          r"only; give each prompt some text"):
        list(Corpus(texts=["ok", "  \n"]))
    jsonl = write(tmp_path / "e.jsonl", '"ok"\n\n{"text": " "}\n')
    with pytest.raises(PromptError, match=r"prompt 2 \(.*e\.jsonl:3\) is empty"):
        list(Corpus([jsonl], texts=["t"]))
    csv_file = write(tmp_path / "e.csv", "text\nok\n\"\"\n")
    with pytest.raises(PromptError, match=r"prompt 1 \(.*e\.csv:3\) is empty"):
        list(Corpus([csv_file]))
    parquet = write_parquet(tmp_path / "e.parquet", {"text": ["ok", "ok", "\t"]})
    with pytest.raises(PromptError, match=r"prompt 2 \(.*e\.parquet record 3\) is empty"):
        list(Corpus([parquet]))


def test_non_utf8_names_the_file_line_and_byte(tmp_path):
    path = write(tmp_path / "bad.txt", b"first\nsecond\nab\xffcd\n")
    with pytest.raises(CorpusError, match=r"prompt file .*bad\.txt is not UTF-8 \(line 3, byte "
                                          r"15: b'\\xff'\); re-encode it as UTF-8"):
        list(Corpus([path]))
    bom = write(tmp_path / "bom.jsonl", b'\xef\xbb\xbf"hi"\n\xc3(\n')
    with pytest.raises(CorpusError, match=r"bom\.jsonl is not UTF-8 \(line 2, byte 8: "):
        list(Corpus([bom]))
    csv_file = write(tmp_path / "bad.csv", b"text\nok\n\xe9t\xe9\n")
    with pytest.raises(CorpusError, match=r"bad\.csv is not UTF-8 \(line 3, byte 8: "):
        list(Corpus([csv_file]))


def test_jsonl_errors_name_file_and_line(tmp_path):
    cases = {
        '"ok"\n{"text": }\n': r"j\.jsonl:2: not valid JSON",
        '"ok"\n\n42\n': r'j\.jsonl:3: expected a string or an object with "text" or "prompt" or "messages"',
        '{"body": "x"}\n': r'j\.jsonl:1: the object has no "text" or "prompt" or "messages" key \(its keys: '
                           r"body\)",
        '{"text": 5}\n': r'j\.jsonl:1: the "text" value is of type int, not text',
        '{"text": null}\n': r'j\.jsonl:1: the "text" value is null, not text',
    }
    for content, message in cases.items():
        path = write(tmp_path / "j.jsonl", content)
        with pytest.raises(CorpusError, match=message):
            list(Corpus([path]))
    path = write(tmp_path / "j.jsonl", '{"text": "a", "key": 1}\n{"text": "b"}\n"c"\n')
    with pytest.raises(CorpusError, match=r'j\.jsonl:1: the object has no "body" key'):
        list(Corpus([path], text_column="body"))
    with pytest.raises(CorpusError, match=r'j\.jsonl:2: the object has no "key" id key'):
        list(Corpus([path], id_column="key"))
    path = write(tmp_path / "j.jsonl", '{"text": "a", "key": 1}\n"c"\n')
    with pytest.raises(CorpusError, match=r'j\.jsonl:2: a JSON string has no "key" id'):
        list(Corpus([path], id_column="key"))


def test_column_errors_list_the_columns(tmp_path):
    csv_file = write(tmp_path / "c.csv", "a,b\n1,2\n")
    parquet = write_parquet(tmp_path / "p.parquet", {"a": ["x"], "text": ["y"]})
    with pytest.raises(CorpusError, match=r'c\.csv has no "text" or "prompt" or "messages" column \(its '
                                          r"columns: a, b\); name the text column"):
        list(Corpus([csv_file]))
    with pytest.raises(CorpusError, match=r'p\.parquet has no "body" column \(its columns: a, '
                                          r"text\)"):
        list(Corpus([parquet], text_column="body"))
    with pytest.raises(CorpusError, match=r'p\.parquet has no "key" id column \(its columns: '
                                          r"a, text\)"):
        list(Corpus([parquet], id_column="key"))
    txt = write(tmp_path / "t.txt", "x\n")
    with pytest.raises(CorpusError, match=r't\.txt: a \.txt file has no "key" id column'):
        list(Corpus([txt], id_column="key"))
    assert texts(Corpus([txt], text_column="body")) == ["x"]  # a .txt has no columns to name


def test_bad_values_and_bad_files(tmp_path):
    ints = write_parquet(tmp_path / "i.parquet", {"text": ["a", "b", "c"]})
    write_parquet(ints, {"text": pa.array(["a", None, "c"])})
    with pytest.raises(CorpusError, match=r'i\.parquet record 2: the "text" value is null'):
        list(Corpus([ints]))
    numbers = write_parquet(tmp_path / "n.parquet", {"text": [1, 2]})
    with pytest.raises(CorpusError, match=r'n\.parquet record 1: the "text" value is of type int'):
        list(Corpus([numbers]))
    fake = write(tmp_path / "f.parquet", "not parquet at all")
    with pytest.raises(CorpusError, match=r"f\.parquet is not a readable Parquet file"):
        list(Corpus([fake]))
    short = write(tmp_path / "s.csv", "id,text\n1,ok\n2\n")
    with pytest.raises(CorpusError, match=r"s\.csv:3: the row has 1 fields, the header 2"):
        list(Corpus([short]))
    quote = write(tmp_path / "q.csv", 'text\n"never closed\n')
    with pytest.raises(CorpusError, match=r"q\.csv:\d+: not valid CSV"):
        list(Corpus([quote]))


@pytest.mark.parametrize("through", ["datasets", "pyarrow"])
def test_broken_dataset_folders(tmp_path, monkeypatch, through):
    if through == "pyarrow":
        monkeypatch.setitem(sys.modules, "datasets", None)
    folder = tmp_path / "ds"
    folder.mkdir()
    write(folder / "dataset_info.json", "{}")
    write(folder / "state.json", json.dumps({"_data_files": [{"filename": "gone.arrow"}]}))
    with pytest.raises(CorpusError, match=r"state\.json lists a data file 'gone\.arrow' that "
                                          r"is not in .*ds; save the dataset again"):
        list(Corpus([folder]))
    with pytest.raises(CorpusError, match="gone.arrow"):
        Corpus([folder]).describe()
    write(folder / "state.json", "{not json")
    with pytest.raises(CorpusError, match=r"cannot read the data files .*state\.json lists"):
        list(Corpus([folder]))


# --- describe --------------------------------------------------------------------------------

def test_describe_hashes_texts_length_prefixed():
    def digest(values):
        return Corpus(texts=values).describe()["texts_sha256"]

    assert digest(["p\x00q"]) != digest(["p", "q"])
    assert digest(["ab"]) != digest(["a", "b"]) != digest(["a", "b", ""])
    assert digest(["p", "q"]) == digest(["p", "q"])
    assert digest(["\udcff"])  # a lone surrogate (surrogateescape'd argv) still hashes


def test_describe_names_every_resolved_file(tmp_path, monkeypatch, hf_dataset):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "d"
    folder.mkdir()
    a = write(folder / "a.txt", "one\n")
    corpus = Corpus(["d", "d/*.txt", hf_dataset / "one"], texts=["t"], text_column="text",
                    limit=5, shard=(0, 2))
    before = corpus.describe()
    json.dumps(before)
    paths = [s["path"] for s in before["sources"]]
    assert paths[:2] == [str(a.resolve())] * 2 and all(os.path.isabs(p) for p in paths)
    assert paths[2].endswith("state.json") and sum(p.endswith(".arrow") for p in paths) == 3
    assert before["sources"][0]["size"] == 4 and before["sources"][0]["mtime_ns"] > 0
    assert {k: before[k] for k in ["text_column", "id_column", "limit", "shard"]} == {
        "text_column": "text", "id_column": None, "limit": 5, "shard": [0, 2]}
    assert corpus.describe() == before
    write(folder / "b.txt", "two\n")  # a file added to the folder
    assert corpus.describe() != before
    os.remove(folder / "b.txt")
    assert corpus.describe() == before
    write(a, "ONE\n")
    os.utime(a, ns=(1, before["sources"][0]["mtime_ns"] + 10**9))  # same size, newer
    assert corpus.describe() != before
