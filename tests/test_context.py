from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from clinlinker_spark.context import (
    attach_context,
    has_context,
    marked_context,
    mention_context,
    sentence_spans,
)
from clinlinker_spark.corpora import read_gold
from clinlinker_spark.errors import InputDataError

# written in the style of the CodiEsp case reports: abbreviations with periods, decimal
# numbers, units, lists on lines of their own, a semicolon-joined list of findings
REPORT = (
    "Varón de 67 años, fumador de 20 cigarrillos/día y bebedor ocasional. "
    "Remitido por el Dr. Martínez por hematuria macroscópica de 2 sem. de evolución.\n"
    "Antecedentes personales:\n"
    "- HTA en tto. con enalapril 20 mg.\n"
    "- DM tipo 2.\n"
    "Exploración: TA 150/90; FC 88 lpm; Tª 37.8 ºC. Se palpa masa en flanco izq. de aprox. "
    "5 cm. En la TAC se observa una lesión renal izquierda de 5.4 x 4.2 cm compatible con "
    "carcinoma de células claras. Se pautó paracetamol 1 g cada 8 h. Recibió vitamina D. "
    "¿Metástasis? No se objetivaron."
)


def sentences(text: str) -> list[str]:
    return [text[s:e] for s, e in sentence_spans(text)]


def test_sentence_splitter_on_a_clinical_report() -> None:
    assert sentences(REPORT) == [
        "Varón de 67 años, fumador de 20 cigarrillos/día y bebedor ocasional.",
        # "Dr." is an abbreviation; "sem." ends no sentence before a lower-case word
        "Remitido por el Dr. Martínez por hematuria macroscópica de 2 sem. de evolución.",
        "Antecedentes personales:",
        # a list item per line; "tto." is an abbreviation
        "- HTA en tto. con enalapril 20 mg.",
        "- DM tipo 2.",
        # decimals ("37.8") and ";" do not split; "izq." and "aprox." are abbreviations
        "Exploración: TA 150/90; FC 88 lpm; Tª 37.8 ºC.",
        "Se palpa masa en flanco izq. de aprox. 5 cm.",
        "En la TAC se observa una lesión renal izquierda de 5.4 x 4.2 cm compatible con "
        "carcinoma de células claras.",
        # a unit or a single letter before ". " and a capital ends the sentence
        "Se pautó paracetamol 1 g cada 8 h.",
        "Recibió vitamina D.",
        "¿Metástasis?",
        "No se objetivaron.",
    ]


def test_sentence_splitter_edge_cases() -> None:
    assert sentence_spans("") == []
    assert sentences("  \n\n  ") == []
    assert sentences("Sin punto final") == ["Sin punto final"]
    assert sentences("Dolor (EVA 8/10). Mejoría.") == ["Dolor (EVA 8/10).", "Mejoría."]
    assert sentences("¡Alerta! «Cita» mañana...  Tras ello, alta.") == [
        "¡Alerta!", "«Cita» mañana...", "Tras ello, alta."]


def test_mention_context_offsets_point_at_the_mention() -> None:
    for mention in ("hematuria macroscópica", "carcinoma de células claras", "DM tipo 2",
                    "masa", "Metástasis"):
        start = REPORT.index(mention)
        context, s, e = mention_context(REPORT, start, start + len(mention))
        assert context[s:e] == mention
        assert context in sentences(REPORT)


def test_mention_context_across_sentences_and_long_sentences() -> None:
    start = REPORT.index("vitamina D.")
    end = REPORT.index("Metástasis") + len("Metástasis")
    context, s, e = mention_context(REPORT, start, end)
    assert context == "Recibió vitamina D. ¿Metástasis?"  # the union of what it touches
    assert context[s:e] == REPORT[start:end]
    # a sentence without punctuation longer than max_chars: a window at word boundaries
    words = " ".join(f"palabra{i}" for i in range(200))
    start = words.index("palabra100")
    context, s, e = mention_context(words, start, start + len("palabra100"), max_chars=60)
    assert len(context) <= 60 and context[s:e] == "palabra100"
    assert all(w.startswith("palabra") for w in context.split())  # no word cut in two
    with pytest.raises(InputDataError, match="outside"):
        mention_context("corto", 2, 40)


def test_marked_context_and_has_context() -> None:
    assert marked_context("fumadora de 20 cigarrillos", 12, 26) == (
        "fumadora de << 20 cigarrillos >>")
    with pytest.raises(InputDataError):
        marked_context("abc", 2, 9)
    mask = has_context(pd.Series(["a b", "", None, "abc", "abc"]), pd.Series([0, 0, 0, 2, -1]),
                       pd.Series([1, 0, 0, 9, 1]))
    assert mask.tolist() == [True, False, False, False, False]


def test_codiesp_reader_attaches_context(tmp_path: Path) -> None:
    texts = tmp_path / "text_files"
    texts.mkdir()
    (texts / "doc1.txt").write_text(REPORT, encoding="utf-8")
    start = REPORT.index("carcinoma de células claras")
    end = start + len("carcinoma de células claras")
    smoke = REPORT.index("fumador")
    gold = tmp_path / "devX.tsv"
    gold.write_text(
        f"doc1\tDIAGNOSTICO\tc64.2\tcarcinoma de células claras\t{start} {end}\n"
        f"doc1\tDIAGNOSTICO\tf17.210\tfumador\t{smoke} {smoke + 7}\n"
        f"doc2\tDIAGNOSTICO\tr31.0\thematuria\t0 9\n", encoding="utf-8")
    plain = read_gold(gold, "codiesp")
    assert "context" not in plain.columns
    mentions = read_gold(gold, "codiesp", text_dir=texts)
    assert mentions["mention_id"].tolist() == plain["mention_id"].tolist()
    first, second, missing = mentions.to_dict("records")
    assert first["context"].startswith("En la TAC")
    assert first["context"][first["context_start"]:first["context_end"]] == first["text"]
    assert second["context"][second["context_start"]:second["context_end"]] == "fumador"
    assert "20 cigarrillos" in second["context"]
    # doc2 has no text file: no context, linked as without one
    assert (missing["context"], missing["context_start"], missing["context_end"]) == ("", -1, -1)
    assert has_context(mentions["context"], mentions["context_start"],
                       mentions["context_end"]).tolist() == [True, True, False]
    with pytest.raises(InputDataError, match="not found"):
        attach_context(plain, tmp_path / "nowhere")


def test_distemist_text_file_names(tmp_path: Path) -> None:
    # DisTEMIST annotations name a document with or without the "es-" of its text file
    texts = tmp_path / "text_files"
    texts.mkdir()
    (texts / "es-S0001.txt").write_text("Dolor torácico. Disnea de esfuerzo.", encoding="utf-8")
    gold = tmp_path / "linking.tsv"
    gold.write_text("filename\tmark\tlabel\toff0\toff1\tspan\tcode\tsemantic_rel\n"
                    "S0001\tT1\tENFERMEDAD\t16\t22\tDisnea\t267036007\tEXACT\n",
                    encoding="utf-8")
    row = read_gold(gold, "distemist", text_dir=texts).iloc[0]
    assert row["context"] == "Disnea de esfuerzo."
    assert (row["context_start"], row["context_end"]) == (0, 6)
