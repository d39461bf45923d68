from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from clinlinker_spark.corpora import (
    MENTION_COLUMNS,
    clean_mask,
    read_codiesp,
    read_distemist,
    read_gold,
    read_medprocner,
    split_by_document,
)
from clinlinker_spark.errors import InputDataError
from clinlinker_spark.samples import list_samples, sample_path

DISTEMIST_HEADER = "filename\tmark\tlabel\toff0\toff1\tspan\tcode\tsemantic_rel\n"
MEDPROCNER_HEADER = (
    "filename\tlabel\tstart_span\tend_span\ttext\tcode\tsem_rel\tis_abbrev\tis_composite"
    "\tneed_context\n"
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def rows(*lines: str) -> str:
    return "".join(line + "\n" for line in lines)


# --------------------------------------------------------------------------------------------
# DisTEMIST


def test_distemist_flags_composite_and_no_code_and_keeps_them(tmp_path):
    f = write(
        tmp_path / "linking.tsv",
        DISTEMIST_HEADER
        + rows(
            "doc1\tT1\tENFERMEDAD\t10\t20\tabdomen agudo\t9209005\tEXACT",
            "doc1\tT2\tENFERMEDAD\t30\t45\tfiebre y tos\t386661006+49727002\tCOMPOSITE",
            "doc2\tT1\tENFERMEDAD\t0\t3\tSPM\tNOMAP\tNOMAP",
            "doc2\tT2\tENFERMEDAD\t5\t9\txxxx\tNO_CODE\tNO_CODE",
        ),
    )
    m = read_distemist(f)
    assert list(m.columns) == MENTION_COLUMNS
    assert m["mention_id"].tolist() == ["doc1:T1", "doc1:T2", "doc2:T1", "doc2:T2"]
    assert m["is_composite"].tolist() == [False, True, False, False]
    assert m["is_no_code"].tolist() == [False, False, True, True]
    assert m["codes"].tolist() == [["9209005"], ["386661006", "49727002"], [], []]
    assert m["code"].tolist()[1] == "386661006+49727002"
    assert m["semantic_rel"].tolist()[0] == "EXACT"
    assert m["start"].dtype == "int64" and m["end"].dtype == "int64"
    assert m.loc[1, ["start", "end", "spans"]].tolist() == [30, 45, "30 45"]
    assert clean_mask(m).tolist() == [True, False, False, False]


def test_distemist_missing_column_names_column_and_file(tmp_path):
    f = write(
        tmp_path / "no_code_col.tsv",
        "filename\tmark\tlabel\toff0\toff1\tspan\n" + rows("d\tT1\tENFERMEDAD\t0\t3\tabc"),
    )
    with pytest.raises(InputDataError) as err:
        read_distemist(f)
    assert "code" in str(err.value) and "no_code_col.tsv" in str(err.value)


def test_distemist_crossmappings_variant_reads_and_folder_skips_it(tmp_path):
    body = rows("doc1\tT1\tENFERMEDAD\t0\t4\tasma\t195967001\tEXACT")
    write(tmp_path / "b_linking.tsv", DISTEMIST_HEADER + body)
    write(tmp_path / "a_linking.tsv", DISTEMIST_HEADER + rows(
        "doc0\tT1\tENFERMEDAD\t0\t4\tgota\t90560007\tEXACT"))
    cross = write(
        tmp_path / "b_linking_crossmappings.tsv",
        DISTEMIST_HEADER.rstrip("\n") + "\tomim_code\tmesh_code\ticd10_code\thpo_code\n"
        + rows(
            "doc1\tT1\tENFERMEDAD\t0\t4\tasma\t195967001\tEXACT\tNone\tD001249\tJ45\tNone",
            # a spreadsheet mangled this long SNOMED id; it is not a composite code
            "doc1\tT2\tENFERMEDAD\t6\t9\tabc\t1.47202310001191E+016\tEXACT\tNone\tNone\tNone\tNone",
        ),
    )
    c = read_distemist(cross)
    assert c["code"].tolist() == ["195967001", "1.47202310001191E+016"]
    assert c["is_composite"].tolist() == [False, False]
    folder = read_distemist(tmp_path)
    # sorted file order, crossmappings file skipped
    assert folder["mention_id"].tolist() == ["doc0:T1", "doc1:T1"]


def test_quoted_field_unquoted_and_inner_quotes_literal(tmp_path):
    f = write(
        tmp_path / "q.tsv",
        DISTEMIST_HEADER
        + rows(
            'd\tT1\tENFERMEDAD\t0\t30\tparálisis facial "a frigore"\t1\tEXACT',
            'd\tT2\tENFERMEDAD\t40\t60\t"relleno con hueso ""Bio-oss"\t2\tEXACT',
            'd\tT3\tENFERMEDAD\t70\t80\t"piel\t3\tEXACT',
        ),
    )
    m = read_distemist(f)
    assert m["text"].tolist() == [
        'parálisis facial "a frigore"',
        'relleno con hueso "Bio-oss',
        '"piel',  # a stray quote does not swallow the following lines
    ]


def test_empty_text_kept_and_counted_at_warning_without_text(tmp_path, caplog):
    f = write(
        tmp_path / "e.tsv",
        DISTEMIST_HEADER
        + rows("d\tT1\tENFERMEDAD\t0\t3\t\t1\tEXACT", "d\tT2\tENFERMEDAD\t5\t9\tsecreto\t2\tEXACT"),
    )
    with caplog.at_level(logging.INFO, logger="clinlinker_spark.corpora"):
        m = read_distemist(f)
    assert len(m) == 2 and m["text"].tolist()[0] == ""
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("1 mention(s) with empty text" in r.getMessage() for r in warnings)
    assert all("secreto" not in r.getMessage() for r in caplog.records)


def test_bad_offset_names_column_and_row(tmp_path):
    f = write(
        tmp_path / "bad.tsv",
        DISTEMIST_HEADER
        + rows("d\tT1\tENFERMEDAD\t0\t3\tabc\t1\tEXACT", "d\tT2\tENFERMEDAD\tx\t9\tdef\t2\tEXACT"),
    )
    with pytest.raises(InputDataError, match=r"off0.*data row\(s\) 2\b"):
        read_distemist(f)


# --------------------------------------------------------------------------------------------
# MedProcNER


def test_medprocner_composite_with_no_code_part_and_no_code(tmp_path):
    f = write(
        tmp_path / "medprocner_subtask2.tsv",
        MEDPROCNER_HEADER
        + rows(
            "S1\tPROCEDIMIENTO\t10\t31\tAuscultación pulmonar\t449264008\tEXACT\tFalse\tFalse"
            "\tFalse",
            "S1\tPROCEDIMIENTO\t40\t50\tbiopsia x\t433775002+NO_CODE\tEXACT+NO_CODE\tFalse\tTrue"
            "\tFalse",
            "S1\tPROCEDIMIENTO\t60\t65\tlavad\tNO_CODE\tNO_CODE\tFalse\tFalse\tFalse",
            'S2\tPROCEDIMIENTO\t0\t41\t"neovejiga en ""U"" con plegadura tipo Camey"\t118855008'
            "\tNARROW\tFalse\tFalse\tFalse",
        ),
    )
    m = read_medprocner(f)
    assert m["mention_id"].tolist() == [
        "S1:10-31:PROCEDIMIENTO",
        "S1:40-50:PROCEDIMIENTO",
        "S1:60-65:PROCEDIMIENTO",
        "S2:0-41:PROCEDIMIENTO",
    ]
    assert m["codes"].tolist() == [["449264008"], ["433775002"], [], ["118855008"]]
    assert m["is_composite"].tolist() == [False, True, False, False]
    assert m["is_no_code"].tolist() == [False, False, True, False]
    assert m["semantic_rel"].tolist()[1] == "EXACT+NO_CODE"
    assert m["text"].tolist()[3] == 'neovejiga en "U" con plegadura tipo Camey'
    assert len(m["text"].tolist()[3]) == 41  # the offsets agree with the unquoted text


def test_medprocner_without_sem_rel_gives_empty_and_missing_text_errors(tmp_path):
    ok = write(
        tmp_path / "a.tsv",
        "filename\tlabel\tstart_span\tend_span\ttext\tcode\n"
        + rows("S1\tPROCEDIMIENTO\t0\t3\tabc\t1"),
    )
    assert read_medprocner(ok)["semantic_rel"].tolist() == [""]
    bad = write(
        tmp_path / "b.tsv",
        "filename\tlabel\tstart_span\tend_span\tcode\n" + rows("S1\tPROCEDIMIENTO\t0\t3\t1"),
    )
    with pytest.raises(InputDataError) as err:
        read_medprocner(bad)
    assert "text" in str(err.value) and "b.tsv" in str(err.value)


# --------------------------------------------------------------------------------------------
# CodiEsp-X

CODIESP_ROWS = rows(
    "S1\tPROCEDIMIENTO\tbt41zzz\tecografía renal derecha\t307 316;348 361",
    "S1\tDIAGNOSTICO\tq62.11\testenosis pieloureteral\t540 583",
    "S1\tDIAGNOSTICO\tr10.813\tdolor abdominal\t381 447",
    "S1\tDIAGNOSTICO\tr10.811\tdolor abdominal\t381 447",
    "S1\tDIAGNOSTICO\tr10.812\tdolor abdominal\t381 447",
    "S1\tPROCEDIMIENTO\tbw03zzz\tRx tórax\t1773 1782;222 228",
)


def test_codiesp_no_header_discontinuous_spans_and_duplicate_ids(tmp_path):
    m = read_codiesp(write(tmp_path / "devX.tsv", CODIESP_ROWS))
    assert list(m.columns) == MENTION_COLUMNS
    assert m["label"].tolist()[:2] == ["PROCEDIMIENTO", "DIAGNOSTICO"]
    assert m["code"].tolist()[1] == "q62.11" and m["codes"].tolist()[1] == ["q62.11"]
    # discontinuous: spans kept in file order, start/end are the outer bounds
    assert m.loc[0, ["start", "end", "spans"]].tolist() == [307, 361, "307 316;348 361"]
    assert m.loc[5, ["start", "end", "spans"]].tolist() == [222, 1782, "1773 1782;222 228"]
    assert m["mention_id"].tolist() == [
        "S1:307-361:PROCEDIMIENTO",
        "S1:540-583:DIAGNOSTICO",
        "S1:381-447:DIAGNOSTICO",
        "S1:381-447:DIAGNOSTICO#2",
        "S1:381-447:DIAGNOSTICO#3",
        "S1:222-1782:PROCEDIMIENTO",
    ]
    assert m["mention_id"].is_unique
    assert m["semantic_rel"].tolist() == [""] * 6
    assert not m["is_composite"].any() and not m["is_no_code"].any()
    # deterministic: a second read gives the same ids
    assert read_codiesp(tmp_path / "devX.tsv")["mention_id"].tolist() == m["mention_id"].tolist()


def test_codiesp_headed_layout_of_trainx_new(tmp_path):
    f = write(
        tmp_path / "trainX_new.tsv",
        "id\tlabel\twords\tlabel_type\toffset\n"
        + rows(
            "S1\ta23\tbrucelosis\tDIAGNOSTICO\t486 496",
            "S1\t0tt00zz\tnefrectomía\tPROCEDIMIENTO\t10 21",
        ),
    )
    m = read_codiesp(f)
    assert m["code"].tolist() == ["a23", "0tt00zz"]
    assert m["label"].tolist() == ["DIAGNOSTICO", "PROCEDIMIENTO"]
    assert m["text"].tolist() == ["brucelosis", "nefrectomía"]
    assert m["start"].tolist() == [486, 10]


def test_codiesp_header_with_official_names_read_by_name(tmp_path):
    f = write(
        tmp_path / "x.tsv",
        "position\tfilename\tcode\tlabel\ttext\n" + rows("1 5\tS1\tn44.8\tDIAGNOSTICO\tteste"),
    )
    m = read_codiesp(f)
    assert m.loc[0, ["doc_id", "code", "label", "text", "start", "end"]].tolist() == [
        "S1", "n44.8", "DIAGNOSTICO", "teste", 1, 5,
    ]


def test_codiesp_unknown_header_rejected_with_its_names(tmp_path):
    f = write(tmp_path / "odd.tsv", "doc\tcategory\tcode\tmention\tspan\n" + CODIESP_ROWS)
    with pytest.raises(InputDataError) as err:
        read_codiesp(f)
    msg = str(err.value)
    assert "odd.tsv" in msg and "unrecognised CodiEsp-X layout" in msg and "category" in msg


def test_codiesp_bad_position_and_wrong_field_count(tmp_path):
    bad_pos = write(
        tmp_path / "p.tsv",
        rows("S1\tDIAGNOSTICO\ta1\tabc\t1 3", "S1\tDIAGNOSTICO\ta2\tdef\t5-9"),
    )
    with pytest.raises(InputDataError, match=r"position.*data row\(s\) 2\b"):
        read_codiesp(bad_pos)
    four = write(tmp_path / "four.tsv", rows("S1\tDIAGNOSTICO\tabc\t1 3"))
    with pytest.raises(InputDataError):
        read_codiesp(four)


def test_unique_ids_do_not_collide_with_existing_suffixed_ids(tmp_path):
    f = write(
        tmp_path / "ids.tsv",
        DISTEMIST_HEADER
        + rows(
            "d\tT1\tENFERMEDAD\t0\t3\ta\t1\tEXACT",
            "d\tT1\tENFERMEDAD\t4\t6\tb\t2\tEXACT",
            "d\tT1#2\tENFERMEDAD\t7\t9\tc\t3\tEXACT",
        ),
    )
    ids = read_distemist(f)["mention_id"].tolist()
    assert ids == ["d:T1", "d:T1#3", "d:T1#2"]
    assert len(set(ids)) == 3


def test_read_gold_dispatch_and_errors(tmp_path):
    f = write(tmp_path / "x.tsv", CODIESP_ROWS)
    assert len(read_gold(f, "codiesp")) == 6
    with pytest.raises(InputDataError, match="unknown gold corpus format"):
        read_gold(f, "brat")
    with pytest.raises(InputDataError, match="not found"):
        read_gold(tmp_path / "missing.tsv", "codiesp")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(InputDataError, match="no \\*.tsv"):
        read_gold(empty_dir, "distemist")


# --------------------------------------------------------------------------------------------
# Document split


def _many_docs(n_docs: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"doc_id": [f"doc{i}" for i in range(n_docs) for _ in range(3)], "x": range(3 * n_docs)}
    )


def test_split_by_document_is_deterministic_disjoint_and_order_free():
    df = _many_docs(50)
    train, test = split_by_document(df, test_fraction=0.2, seed=13)
    assert set(train["doc_id"]).isdisjoint(test["doc_id"])
    assert len(train) + len(test) == len(df)
    assert test["doc_id"].nunique() == 10
    again_train, again_test = split_by_document(df.iloc[::-1], test_fraction=0.2, seed=13)
    assert set(again_test["doc_id"]) == set(test["doc_id"])
    _, other = split_by_document(df, test_fraction=0.2, seed=14)
    assert set(other["doc_id"]) != set(test["doc_id"])
    # rows keep input order within a side
    assert train["x"].is_monotonic_increasing


def test_split_by_document_edges():
    train, test = split_by_document(_many_docs(2), test_fraction=0.01)
    assert train["doc_id"].nunique() == 1 and test["doc_id"].nunique() == 1
    with pytest.raises(ValueError):
        split_by_document(_many_docs(3), test_fraction=1.0)


# --------------------------------------------------------------------------------------------
# Shipped samples


def test_samples_load_with_the_readers():
    assert {"codiesp_dev_sample.tsv", "codiesp_train_sample.tsv", "distemist_sample.tsv",
            "cie10_es.csv"} <= set(list_samples())
    dev = read_codiesp(sample_path("codiesp_dev_sample.tsv"))
    train = read_codiesp(sample_path("codiesp_train_sample.tsv"))
    dis = read_distemist(sample_path("distemist_sample.tsv"))
    assert 350 <= len(dev) <= 500 and set(dev["label"]) == {"DIAGNOSTICO", "PROCEDIMIENTO"}
    assert 1800 <= len(train) <= 2300
    assert 350 <= len(dis) <= 500 and dis["is_composite"].any()
    for m in (dev, train, dis):
        assert m["mention_id"].is_unique
    assert set(dev["doc_id"]).isdisjoint(train["doc_id"])
    with pytest.raises(FileNotFoundError, match="available"):
        sample_path("nope.tsv")


@pytest.mark.realdata
def test_samples_hold_whole_documents(shared_data):
    for sample, full in [
        ("codiesp_dev_sample.tsv", "codiesp/dev/devX.tsv"),
        ("codiesp_train_sample.tsv", "codiesp/train/trainX.tsv"),
    ]:
        s = read_codiesp(sample_path(sample))
        f = read_codiesp(shared_data / full)
        f = f[f["doc_id"].isin(set(s["doc_id"]))]
        assert len(f) == len(s)
        assert f["mention_id"].tolist() == s["mention_id"].tolist()


# --------------------------------------------------------------------------------------------
# Real data


@pytest.mark.realdata
def test_real_codiesp_counts(shared_data):
    dev = read_codiesp(shared_data / "codiesp/dev/devX.tsv")
    train = read_codiesp(shared_data / "codiesp/train/trainX.tsv")
    assert (dev["label"] == "DIAGNOSTICO").sum() == 3431
    assert len(dev) == 4477
    assert (train["label"] == "DIAGNOSTICO").sum() == 7209
    assert len(train) == 9181
    assert dev["mention_id"].is_unique and train["mention_id"].is_unique
    assert (train["spans"].str.contains(";")).sum() == 1787
    assert not train["is_composite"].any() and not train["is_no_code"].any()
    new = read_codiesp(shared_data / "codiesp/train/trainX_new.tsv")
    assert len(new) == 12157 and set(new["label"]) == {"DIAGNOSTICO", "PROCEDIMIENTO"}


@pytest.mark.realdata
def test_real_distemist_counts(shared_data):
    folder = shared_data / "distemist/training/subtrack2_linking"
    m = read_distemist(folder)
    assert len(m) == 5136 and m["mention_id"].is_unique
    assert m["is_composite"].sum() == 200
    assert m["is_no_code"].sum() == 1  # the NOMAP row
    one = read_distemist(folder / "distemist_subtrack2_training1_linking.tsv")
    cross = read_distemist(folder / "distemist_subtrack2_training1_linking_crossmappings.tsv")
    assert len(one) == 1512 and cross["mention_id"].tolist() == one["mention_id"].tolist()


@pytest.mark.realdata
def test_real_medprocner_counts(shared_data):
    path = shared_data / "medprocner/train/tsv/medprocner_tsv_train_subtask2.tsv"
    m = read_medprocner(path)
    assert len(m) == 4857 and m["mention_id"].is_unique
    raw = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    assert m["is_composite"].tolist() == (raw["is_composite"] == "True").tolist()
    assert m["is_no_code"].sum() == 51
    assert (m["end"] - m["start"]).tolist() == m["text"].str.len().tolist()
