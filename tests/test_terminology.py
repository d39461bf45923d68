from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from clinlinker_spark.config import TerminologyConfig, TerminologySourceConfig
from clinlinker_spark.corpora import read_codiesp
from clinlinker_spark.errors import InputDataError
from clinlinker_spark.samples import sample_path
from clinlinker_spark.terminology import (
    TERMINOLOGY_COLUMNS,
    build_terminology,
    load_terminology,
    read_cie10,
    read_gazetteer,
    read_table,
    terminology_stats,
    terms_from_mentions,
)

CIE10_HEADER = "code,code_0,code_1,code_2,code_3,code_4,description,level,source\n"
CIE10_ROWS = (
    "A00-B99,,,,,,Ciertas enfermedades infecciosas y parasitarias,0,icdcode.info\n"
    "A00-A09,A00-B99,,,,,Enfermedades infecciosas intestinales,1,icdcode.info\n"
    "A00,A00-B99,A00-A09,,,,Cólera,2,icdcode.info\n"
    "A000,A00-B99,A00-A09,A00,,,\"Cólera debido a Vibrio cholerae 01, biotipo cholerae\",3,"
    "icdcode.info\n"
    "N448,N00-N99,N40-N53,N44,,,Otras enfermedades no inflamatorias del testículo,3,deis.cl\n"
)
CODIESP_ROWS = (
    "S1\tDIAGNOSTICO\tn44.8\tteste derecho aumentado\t10 33\n"
    "S1\tDIAGNOSTICO\ta00\tCólera\t40 46\n"
    "S2\tDIAGNOSTICO\ta00\tcólera\t0 6\n"
    "S2\tDIAGNOSTICO\tn44.8\tTESTE  derecho aumentado\t10 34\n"
    "S2\tPROCEDIMIENTO\tbw03zzz\tRx tórax\t40 48\n"
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def mention_table(rows: list[tuple[str, str]]) -> pd.DataFrame:
    """A minimal mention table: (text, code) pairs."""
    codes = [c for _, c in rows]
    return pd.DataFrame(
        {
            "text": [t for t, _ in rows],
            "code": codes,
            "label": "DIAGNOSTICO",
            "is_composite": ["+" in c for c in codes],
            "is_no_code": [c == "NO_CODE" for c in codes],
        }
    )


# --------------------------------------------------------------------------------------------
# Readers


def test_gazetteer_mainterm_parsing_and_columns(tmp_path):
    f = write(
        tmp_path / "dictionary_distemist.tsv",
        "code\tlanguage\tterm\tsemantic_tag\tmainterm\n"
        "73211009\tes\tdiabetes mellitus\tdisorder\t1\n"
        "73211009\tes\tDM\tdisorder\t0\n"
        "38341003\tes\thipertensión arterial\tdisorder\tTrue\n"
        "38341003\tes\tHTA\tdisorder\tfalse\n",
    )
    t = read_gazetteer(f)
    assert list(t.columns) == TERMINOLOGY_COLUMNS
    assert t["is_main_term"].tolist() == [True, False, True, False]
    assert t["semantic_tag"].tolist() == ["disorder"] * 4
    assert t["source"].tolist() == ["dictionary_distemist"] * 4
    assert t["term_norm"].tolist()[1] == "dm" and t["term"].tolist()[1] == "DM"
    assert t["mention_count"].dtype == "int64" and t["mention_count"].sum() == 0
    assert read_gazetteer(f, source="snomed")["source"].unique().tolist() == ["snomed"]


def test_gazetteer_bad_mainterm_and_missing_term(tmp_path):
    bad = write(
        tmp_path / "g.tsv",
        "code\tterm\tsemantic_tag\tmainterm\n1\ta\tdisorder\t1\n2\tb\tdisorder\tmaybe\n",
    )
    with pytest.raises(InputDataError, match=r"mainterm.*rows 2\b"):
        read_gazetteer(bad)
    no_term = write(tmp_path / "h.tsv", "code\tsynonym\n1\ta\n")
    with pytest.raises(InputDataError) as err:
        read_gazetteer(no_term)
    assert "term" in str(err.value) and "h.tsv" in str(err.value) and "synonym" in str(err.value)


def test_table_reader_csv_tsv_txt_parquet_with_configurable_columns(tmp_path):
    frame = pd.DataFrame(
        {
            "concept": ["0012", "0012", "E11.9"],
            "name": ["Término A", "sinónimo a", "Diabetes tipo 2"],
            "tag": ["finding", "finding", "disorder"],
            "preferred": ["1", "0", "1"],
        }
    )
    kwargs = dict(code_column="concept", term_column="name", semantic_tag_column="tag",
                  main_term_column="preferred")
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_csv(tmp_path / "t.tsv", index=False, sep="\t")
    frame.to_csv(tmp_path / "t.txt", index=False, sep=";")
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    for name in ("t.csv", "t.tsv", "t.txt", "t.parquet"):
        t = read_table(tmp_path / name, **kwargs)
        assert list(t.columns) == TERMINOLOGY_COLUMNS, name
        assert t["code"].tolist() == ["0012", "0012", "E11.9"], name  # leading zeros kept
        assert t["code_key"].tolist() == ["0012", "0012", "e119"], name
        assert t["is_main_term"].tolist() == [True, False, True], name
        assert t["semantic_tag"].tolist() == ["finding", "finding", "disorder"], name
        assert t["source"].unique().tolist() == ["t"], name


def test_table_reader_defaults_and_numeric_parquet_codes(tmp_path):
    pd.DataFrame({"code": [101, 101, 202], "term": ["uno", "uno bis", "dos"]}).to_parquet(
        tmp_path / "n.parquet"
    )
    t = read_table(tmp_path / "n.parquet", source="codes")
    assert t["code"].tolist() == ["101", "101", "202"]
    # no main-term column: the first term of each code is its main term
    assert t["is_main_term"].tolist() == [True, False, True]
    assert t["semantic_tag"].tolist() == ["", "", ""]
    assert t["source"].unique().tolist() == ["codes"]


def test_table_reader_missing_column_names_column_file_and_columns(tmp_path):
    f = write(tmp_path / "terms.csv", "id,label\n1,a\n")
    with pytest.raises(InputDataError) as err:
        read_table(f, code_column="id", term_column="term")
    msg = str(err.value)
    assert "term" in msg and "terms.csv" in msg and "id, label" in msg
    with pytest.raises(InputDataError, match="semantic"):
        read_table(f, code_column="id", term_column="label", semantic_tag_column="semantic")
    with pytest.raises(InputDataError, match="extension"):
        read_table(write(tmp_path / "terms.json", "{}"))
    with pytest.raises(InputDataError, match="not found"):
        read_table(tmp_path / "absent.csv")


def test_read_cie10_levels(tmp_path):
    f = write(tmp_path / "cie10.csv", CIE10_HEADER + CIE10_ROWS)
    t = read_cie10(f)
    assert t["code"].tolist() == ["A00", "A00.0", "N44.8"]  # ICD-10 spelling
    assert t["code_key"].tolist() == ["a00", "a000", "n448"]
    assert t["term"].tolist()[1] == "Cólera debido a Vibrio cholerae 01, biotipo cholerae"
    assert t["is_main_term"].all() and (t["semantic_tag"] == "").all()
    assert t["source"].unique().tolist() == ["cie10"]
    assert read_cie10(f, min_level=3)["code"].tolist() == ["A00.0", "N44.8"]
    # chapters and blocks (A00-B99, A00-A09) are left out at every level
    assert read_cie10(f, min_level=0)["code"].tolist() == ["A00", "A00.0", "N44.8"]


def test_read_cie10_leaves_blocks_out_and_sets_parents(tmp_path):
    rows = CIE10_HEADER + CIE10_ROWS + (
        # a block listed at level 2 (the real list has 60 of them) and its category
        "C64-C68,C00-D49,,,,,Tumores malignos del tracto urinario,2,icdcode.info\n"
        "C64,C00-D49,C64-C68,,,,Tumor maligno del riñón,2,icdcode.info\n"
        "C649,C00-D49,C64-C68,C64,,,\"Tumor maligno del riñón, excepto pelvis\",3,deis.cl\n"
    )
    t = read_cie10(write(tmp_path / "cie10.csv", rows))
    assert not t["code"].str.contains("-").any()
    assert t["code"].tolist() == ["A00", "A00.0", "N44.8", "C64", "C64.9"]
    # the nearest ancestor that is a code: blocks are never parents
    assert t["parent_key"].tolist() == ["", "a00", "n44", "", "c64"]
    # the index of each row is its data row in the file (the block's row 6 is skipped)
    assert t.index.tolist() == [2, 3, 4, 6, 7]


def test_read_icd10cm_from_the_package():
    from clinlinker_spark.terminology import read_icd10cm

    t = read_icd10cm()
    assert list(t.columns) == TERMINOLOGY_COLUMNS
    assert t["source"].unique().tolist() == ["icd10cm"]
    main = t[t["is_main_term"]]
    assert main["code_key"].is_unique
    c569 = main[main["code_key"] == "c569"]
    assert c569["code"].tolist() == ["C56.9"]
    assert c569["parent_key"].tolist() == ["c56"]
    assert "ovary" in c569["term"].item().lower()
    # a category's parent is a block, which is no code: no parent
    assert main.loc[main["code_key"] == "c56", "parent_key"].tolist() == [""]
    # chapters and blocks are not codes of the terminology
    assert not t["code"].str.contains("-").any()
    assert not t["code_key"].isin(["c00-d49", "c51-c58"]).any()
    assert not t["code"].str.fullmatch(r"\d+").any()  # chapters "1".."22"
    # every parent is a code of the table, never the code itself (C50 is also the name of
    # the block above the category C50)
    parents = set(t["parent_key"]) - {""}
    assert parents <= set(t["code_key"])
    assert not (t["parent_key"] == t["code_key"]).any()
    assert main.loc[main["code_key"] == "c50", "parent_key"].tolist() == [""]
    assert main.loc[main["code_key"] == "c501", "parent_key"].tolist() == ["c50"]
    # inclusion terms are synonym rows of their code
    synonyms = t[~t["is_main_term"]]
    classical = synonyms[synonyms["term_norm"] == "classical cholera"]
    assert classical["code"].tolist() == ["A00.0"]
    assert classical["parent_key"].tolist() == ["a00"]
    assert (synonyms["code_key"].isin(set(main["code_key"]))).all()
    assert len(synonyms) > 10_000 and len(main) > 90_000


def test_terms_from_mentions_counts_and_exclusions():
    m = mention_table(
        [
            ("Teste  derecho", "N44.8"),
            ("teste derecho", "n448"),
            ("TESTE DERECHO", "n44.8"),
            ("teste derecho", "z20.8"),
            ("fiebre y tos", "r50+r05"),
            ("algo", "NO_CODE"),
            ("   ", "a00"),
        ]
    )
    t = terms_from_mentions(m, source="train")
    assert list(t.columns) == TERMINOLOGY_COLUMNS
    assert t["term_norm"].tolist() == ["teste derecho", "teste derecho"]
    assert t["code_key"].tolist() == ["n448", "z208"]
    assert t["mention_count"].tolist() == [3, 1]
    assert t["term"].tolist()[0] == "Teste  derecho"  # first original text kept
    assert t["code"].tolist()[0] == "N44.8"
    assert not t["is_main_term"].any()
    assert t["source"].unique().tolist() == ["train"]


# --------------------------------------------------------------------------------------------
# build_terminology


def _table(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for column, default in [("is_main_term", True), ("semantic_tag", ""), ("source", "s"),
                            ("mention_count", 0)]:
        if column not in df:
            df[column] = default
    return df


def test_build_normalises_and_keeps_original_text():
    raw = "Ｄｉａｂｅｔｅｓ\u00a0 Mellitus\t"  # full-width letters, no-break space, tab
    t = build_terminology([_table([{"code": " E11.9 ", "term": raw}])])
    assert t["term"].tolist() == [raw]
    assert t["term_norm"].tolist() == ["diabetes mellitus"]
    assert t["code_key"].tolist() == ["e119"]
    assert t.index.tolist() == [0]


def test_build_rejects_row_without_code_naming_source_and_row(tmp_path):
    f = write(
        tmp_path / "g.tsv",
        "code\tterm\tsemantic_tag\tmainterm\n1\tuno\td\t1\n\tsin código\td\t0\n3\t  \td\t1\n",
    )
    g = read_gazetteer(f)
    with pytest.raises(InputDataError) as err:
        build_terminology([g])
    msg = str(err.value)
    assert msg.startswith("2 terminology row(s)")
    assert "'g'" in msg and "data row(s) 2, 3" in msg
    assert "sin código" not in msg  # no clinical text in errors


def test_build_row_numbers_survive_reader_filtering(tmp_path):
    rows = CIE10_HEADER + CIE10_ROWS + "B00,A00-B99,,,,,,2,icdcode.info\n"
    t = read_cie10(write(tmp_path / "c.csv", rows))
    with pytest.raises(InputDataError, match=r"'cie10': data row\(s\) 6 "):
        build_terminology([t])


def test_build_skip_mode_drops_and_warns(caplog):
    frame = _table(
        [{"code": "1", "term": "uno"}, {"code": None, "term": "x"}, {"code": "3", "term": None}]
    )
    with caplog.at_level(logging.WARNING, logger="clinlinker_spark.terminology"):
        t = build_terminology([frame], on_bad_rows="skip")
    assert t["code"].tolist() == ["1"]
    assert any("skipped 2 row(s)" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError):
        build_terminology([frame], on_bad_rows="ignore")


def test_build_dedupes_sums_counts_ors_main_and_joins_sources():
    dictionary = _table(
        [
            {"code": "A00", "term": "Cólera", "source": "cie10", "is_main_term": True},
            {"code": "N448", "term": "Otras", "source": "cie10", "is_main_term": True},
        ]
    )
    mentions1 = _table(
        [
            {"code": "a00", "term": "cólera", "source": "train", "is_main_term": False,
             "mention_count": 2},
            {"code": "z99", "term": "nuevo", "source": "train", "is_main_term": False,
             "mention_count": 1},
        ]
    )
    mentions2 = _table(
        [
            {"code": "A00", "term": "CÓLERA ", "source": "dev", "is_main_term": False,
             "mention_count": 5, "semantic_tag": "disorder"},
            {"code": "A00", "term": "cólera", "source": "train", "is_main_term": False,
             "mention_count": 1},
        ]
    )
    t = build_terminology([dictionary, mentions1, mentions2])
    assert list(t.columns) == TERMINOLOGY_COLUMNS
    assert t["code"].tolist() == ["A00", "N448", "z99"]  # order of first appearance
    first = t.iloc[0].to_dict()
    assert first["term"] == "Cólera" and first["code"] == "A00"
    assert first["mention_count"] == 8
    assert first["is_main_term"] is True or first["is_main_term"] == True  # noqa: E712
    assert first["source"] == "cie10|train|dev"
    assert first["semantic_tag"] == "disorder"
    assert t["mention_count"].tolist() == [8, 0, 1]
    assert t["mention_count"].dtype == "int64" and t["is_main_term"].dtype == bool
    # rebuilding a built table is a no-op
    again = build_terminology([t])
    pd.testing.assert_frame_equal(again, t)


def test_build_gives_each_code_one_spelling_the_dictionarys():
    mentions = terms_from_mentions(mention_table([
        ("tumor de ovario", "c56.9"), ("Tumor maligno de ovario", "c56.9"),
        ("dolor raro", "r52.x"),
    ]), source="train")
    dictionary = _table([{"code": "C56.9", "term": "Tumor maligno de ovario",
                          "source": "cie10", "parent_key": "C56"}])
    later = _table([{"code": "C569", "term": "neoplasia de ovario", "source": "other"}])
    # the mentions come first: the dictionary's spelling wins all the same
    t = build_terminology([mentions, dictionary, later])
    c569 = t[t["code_key"] == "c569"]
    assert sorted(c569["term_norm"]) == ["neoplasia de ovario", "tumor de ovario",
                                         "tumor maligno de ovario"]
    assert c569["code"].unique().tolist() == ["C56.9"]  # the first dictionary's spelling
    assert c569["parent_key"].unique().tolist() == ["c56"]  # and its parent, on every row
    merged = c569[c569["term_norm"] == "tumor maligno de ovario"].iloc[0]
    assert merged["source"] == "train|cie10" and merged["mention_count"] == 1
    # a code only mentions give keeps the mention's spelling
    assert t.loc[t["code_key"] == "r52x", "code"].tolist() == ["r52.x"]
    assert t.loc[t["code_key"] == "r52x", "parent_key"].tolist() == [""]
    assert (t.groupby("code_key")["code"].nunique() == 1).all()


def test_read_table_with_a_parent_column(tmp_path):
    f = write(tmp_path / "codes.csv",
              "code,term,parent\nC56,Tumor de ovario,\nC56.9,Tumor de ovario no especificado,"
              "C56\nC56.1,Tumor de ovario derecho,c56\n")
    t = read_table(f, parent_column="parent")
    assert t["parent_key"].tolist() == ["", "c56", "c56"]
    assert read_table(f)["parent_key"].tolist() == ["", "", ""]  # no parent column named
    with pytest.raises(InputDataError, match="padre"):
        read_table(f, parent_column="padre")
    config = TerminologyConfig(sources=(TerminologySourceConfig(
        path=str(f), format="table", parent_column="parent"),))
    built = load_terminology(config)
    assert dict(zip(built["code"], built["parent_key"])) == {"C56": "", "C56.9": "c56",
                                                            "C56.1": "c56"}


def test_build_same_text_different_codes_stay_apart():
    frame = _table([{"code": "a", "term": "dolor"}, {"code": "b", "term": "dolor"}])
    t = build_terminology([frame])
    assert t["code"].tolist() == ["a", "b"]


def test_terminology_stats():
    t = build_terminology(
        [
            _table([{"code": "A00", "term": "cólera", "source": "cie10"}]),
            _table([{"code": "a00", "term": "Cólera", "source": "train", "mention_count": 3,
                     "is_main_term": False},
                    {"code": "a01", "term": "tifoidea", "source": "train", "mention_count": 1,
                     "is_main_term": False}]),
        ]
    )
    s = terminology_stats(t)
    assert s == {
        "rows": 2,
        "distinct_codes": 2,
        "distinct_terms": 2,
        "main_terms": 1,
        "mention_rows": 2,
        "mentions": 4,
        "sources": {"cie10": 1, "train": 2},
    }


# --------------------------------------------------------------------------------------------
# load_terminology


def test_load_terminology_from_config(tmp_path):
    cie = write(tmp_path / "cie10.csv", CIE10_HEADER + CIE10_ROWS)
    gold = write(tmp_path / "trainX.tsv", CODIESP_ROWS)
    table = tmp_path / "extra.csv"
    pd.DataFrame({"id": ["X1"], "name": ["término extra"]}).to_csv(table, index=False)
    config = TerminologyConfig(
        name="icd",
        version="t1",
        sources=(
            TerminologySourceConfig(path=str(cie), format="cie10"),
            TerminologySourceConfig(path=str(gold), format="codiesp", name="codiesp_train",
                                    labels=("DIAGNOSTICO",)),
            TerminologySourceConfig(path=str(table), format="table", code_column="id",
                                    term_column="name"),
        ),
    )
    t = load_terminology(config)
    by = {(r.code_key, r.term_norm): r for r in t.itertuples()}
    assert by[("a00", "cólera")].source == "cie10|codiesp_train"
    assert by[("a00", "cólera")].mention_count == 2
    assert by[("n448", "teste derecho aumentado")].mention_count == 2
    assert by[("x1", "término extra")].source == "extra"
    assert not any(k[0] == "bw03zzz" for k in by)  # procedure left out by labels
    assert len(t) == 3 + 1 + 1  # cie10 rows, one new mention term, the table row


def test_load_terminology_label_typo_and_no_sources(tmp_path):
    gold = write(tmp_path / "trainX.tsv", CODIESP_ROWS)
    config = TerminologyConfig(
        sources=(TerminologySourceConfig(path=str(gold), format="codiesp",
                                         labels=("DIAGNOSIS",)),)
    )
    with pytest.raises(InputDataError, match="DIAGNOSTICO, PROCEDIMIENTO"):
        load_terminology(config)
    with pytest.raises(InputDataError, match="no sources"):
        load_terminology(TerminologyConfig())


def test_sample_index_builds():
    cie = read_cie10(sample_path("cie10_es.csv"))
    train = read_codiesp(sample_path("codiesp_train_sample.tsv"))
    t = build_terminology(
        [cie, terms_from_mentions(train[train["label"] == "DIAGNOSTICO"], source="train")]
    )
    raw = pd.read_csv(sample_path("cie10_es.csv"), dtype=str, keep_default_na=False)
    level2 = raw[raw["level"].astype(int) >= 2]
    assert len(level2) == 14268 and level2["code"].str.contains("-").sum() == 60
    assert len(cie) == 14208  # the 60 blocks listed at level >= 2 are left out
    assert len(cie) < len(t) < len(cie) + (train["label"] == "DIAGNOSTICO").sum()
    assert t[["code_key", "term_norm"]].duplicated().sum() == 0


# --------------------------------------------------------------------------------------------
# Real data


@pytest.mark.realdata
def test_real_cie10_level2(shared_data):
    t = read_cie10(shared_data / "terminologies/cie10_es.csv")
    assert len(t) == 14208  # 14,268 rows at level >= 2, less 60 blocks
    assert t["code_key"].is_unique


@pytest.mark.realdata
def test_real_codiesp_index_size(shared_data):
    """cie10 level >= 2 + CodiEsp train DIAGNOSTICO mentions.

    The reference protocol counts 21,477 terms (14,268 + 7,209: every mention a row, no
    de-duplication) and 15,176 codes; its 14,268 CIE-10 rows include 60 blocks (C64-C68, ...),
    which cannot be assigned and are left out here: 14,208 rows. De-duplicating on
    (code_key, term_norm) merges the 7,209 mentions into 3,426 (text, code) rows, 88 of which
    equal a CIE-10 description of the same code: 17,546 rows and 15,116 codes.
    """
    cie = read_cie10(shared_data / "terminologies/cie10_es.csv")
    train = read_codiesp(shared_data / "codiesp/train/trainX.tsv")
    diag = train[train["label"] == "DIAGNOSTICO"]
    mention_terms = terms_from_mentions(diag, source="codiesp_train")
    assert len(cie) + 60 + len(diag) == 21477  # the reference count, before de-duplication
    assert len(mention_terms) == 3426 and mention_terms["mention_count"].sum() == 7209
    t = build_terminology([cie, mention_terms])
    stats = terminology_stats(t)
    assert stats["rows"] == 17546
    assert stats["distinct_codes"] == 15116
    assert stats["mentions"] == 7209
    assert stats["sources"] == {"cie10": 14208, "codiesp_train": 3426}
    assert (t["source"] == "cie10|codiesp_train").sum() == 88
    # one spelling per code: the CIE-10 one (C56.9) where the list has the code
    assert (t.groupby("code_key")["code"].nunique() == 1).all()
    listed = t["code_key"].isin(set(cie["code_key"]))
    assert not t.loc[listed, "code"].str.islower().any()


def test_load_terminology_indexes_one_side_of_a_document_split(shared_data):
    from clinlinker_spark.config import TerminologyConfig, TerminologySourceConfig
    from clinlinker_spark.corpora import read_gold, split_by_document
    from clinlinker_spark.terminology import load_terminology

    path = shared_data / "distemist" / "training" / "subtrack2_linking"
    sides = {}
    for split in ("train", "test"):
        src = TerminologySourceConfig(path=str(path), format="distemist", split=split)
        sides[split] = load_terminology(TerminologyConfig(sources=(src,)))
    train, test = split_by_document(read_gold(path, "distemist"), 0.2, 13)
    clean = lambda m: int((~m["is_composite"] & ~m["is_no_code"]).sum())  # noqa: E731
    assert int(sides["train"]["mention_count"].sum()) == clean(train)
    assert int(sides["test"]["mention_count"].sum()) == clean(test)
