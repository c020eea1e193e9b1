"""What doctor and prepare read of the data (survey.py): each file's format, fields and records checked, and every
problem train would stop on, one line each, from real files and the session's tiny tokenizer."""

from __future__ import annotations

import pytest

from entrypoint.config.schema import TrainConfig
from entrypoint.data import survey
from entrypoint.data.options import DataOptions
from entrypoint.errors import DataError
from tests.support import records as samples


def options(directory, **values) -> DataOptions:
    return DataOptions.of(TrainConfig(data_dir=directory, output_dir=directory.parent / "out", **values))


@pytest.mark.parametrize("records, kind, fmt, fields", [
    (samples.ALPACA, "jsonl", "alpaca", "system, instruction, input, output"),
    (samples.SHAREGPT, "parquet", "sharegpt", "conversations"),
    (None, "parquet", "pretokenized", "input_ids, labels, attention_mask"),
], ids=["alpaca", "sharegpt", "pretokenized"])
def test_each_file_is_reported_with_its_format_fields_and_records_checked(tokenizer, tmp_path, records, kind, fmt,
                                                                          fields):
    records = records or samples.pretokenized(tokenizer)
    samples.write_records(tmp_path / "data", "train", records, kind)
    samples.write_records(tmp_path / "data", "valid", records[:5], kind)
    reports, problems = survey.survey(options(tmp_path / "data"), tokenizer)
    assert problems == [] and [(r.split, r.path.name) for r in reports] == [("train", f"train.{kind}"),
                                                                            ("valid", f"valid.{kind}")]
    assert [r.problems for r in reports] == [[], []]
    assert reports[0].line() == f"{fmt} data from {fields}; {len(records)} records checked (all of them)"
    assert reports[1].checked == 5


def test_only_the_first_records_are_read(tokenizer, tmp_path):
    records = samples.ALPACA + [{"instruction": "Late.", "output": ""}]  # a problem past the limit goes unseen
    samples.write_records(tmp_path / "data", "train", records, "jsonl")
    (report,), _ = survey.survey(options(tmp_path / "data"), tokenizer, limit=10)
    assert (report.checked, report.whole, report.problems) == (10, False, [])
    assert report.line().endswith("10 records checked (the first of the file)")


@pytest.mark.parametrize("name", list(samples.BAD))
def test_each_bad_file_gets_one_line_naming_the_file_the_line_and_the_fix(tokenizer, tmp_path, name):
    path = samples.write_records(tmp_path / "data", "train", samples.bad_records(name), "jsonl")
    (report,), problems = survey.survey(options(tmp_path / "data"), tokenizer)
    assert problems == [] and len(report.problems) == 1 and report.checked == 6
    assert report.problems[0].startswith(f"{path} line 4: ") and "\n" not in report.problems[0]
    assert all(word in report.problems[0] for word in samples.BAD[name][2]), report.problems[0]
    with pytest.raises(DataError) as raised:
        survey.check(options(tmp_path / "data"), tokenizer)
    assert raised.value.problems == report.problems


def test_a_repeated_problem_is_one_line_with_its_count_and_distinct_ones_each_get_theirs(tokenizer, tmp_path):
    unknown = {"conversations": [{"from": "bot", "value": "Hi."}, {"from": "gpt", "value": "Yo."}]}
    unfinished = {"conversations": [{"from": "human", "value": "Hi."}]}
    path = samples.write_records(tmp_path / "data", "train", [samples.SHAREGPT[0], unknown, unknown, unknown,
                                                              unfinished], "jsonl")
    (report,), _ = survey.survey(options(tmp_path / "data"), tokenizer)
    assert report.problems == [
        f"{path} line 2: turn 1 is from 'bot', not a known role (human, user, gpt, assistant, system, function_call, "
        "tool, observation); rename it, e.g. human for the user and gpt for the assistant. (2 more records like it)",
        f"{path} line 5: the conversation ends with a human turn, not the assistant's; end it with the answer (a gpt "
        "turn) or drop the trailing turn."]


def test_records_go_through_the_tokenizer_as_in_training(tokenizer, tmp_path):
    """A chat template that refuses a conversation stops training; the survey renders each record to see it."""
    from tests.support.tokenizers import llama_style

    strict = llama_style(tokenizer, "{% for m in messages %}{% if m['role'] == 'system' %}"
                                    "{{ raise_exception('no system turns') }}{% endif %}{{ m['content'] }}{% endfor %}")
    samples.write_records(tmp_path / "data", "train", samples.SHAREGPT, "jsonl")
    (report,), _ = survey.survey(options(tmp_path / "data"), strict)
    assert len(report.problems) == 1 and "line 1: the chat template rejects this conversation" in report.problems[0]
    assert survey.survey(options(tmp_path / "data"), None)[0][0].problems == []  # without a tokenizer: conversions


def test_pretokenized_ids_are_checked_against_the_vocabulary_given_else_the_tokenizers(tokenizer, tmp_path):
    samples.write_records(tmp_path / "data", "train", samples.pretokenized(tokenizer), "parquet")
    (report,), _ = survey.survey(options(tmp_path / "data"), tokenizer)
    assert report.problems == []
    opts = DataOptions.of(TrainConfig(data_dir=tmp_path / "data", output_dir=tmp_path / "out"), vocab_size=50)
    (report,), _ = survey.survey(opts, tokenizer)
    assert "row 1: token id" in report.problems[0] and "vocabulary of 50 ids" in report.problems[0]


def test_mixed_folders_and_training_and_validation_in_different_formats_are_problems(tokenizer, tmp_path):
    samples.write_records(tmp_path / "data", "train", samples.ALPACA, "jsonl")
    samples.write_records(tmp_path / "data", "valid", samples.SHAREGPT, "jsonl")
    _, problems = survey.survey(options(tmp_path / "data"), tokenizer)
    assert problems == ["the training data is instruction but the validation data is chat; give both in one format."]
    samples.write_records(tmp_path / "mixed", "a", samples.ALPACA, "jsonl")
    samples.write_records(tmp_path / "mixed", "b", samples.SHAREGPT, "parquet")
    _, problems = survey.survey(options(tmp_path / "mixed"), tokenizer)
    assert len(problems) == 1 and "(a.jsonl: alpaca; b.parquet: sharegpt)" in problems[0]


def test_text_files_are_counted_by_document(tokenizer, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("one\ntwo\nthree\n")
    (report,), _ = survey.survey(options(tmp_path / "data"), tokenizer)
    assert (report.fmt, report.checked, report.problems) == ("text", 3, [])


def test_a_saved_datasets_splits_are_read_and_a_bad_row_is_named_by_split_and_row(tokenizer, tmp_path):
    import datasets

    bad = samples.bad_records("sharegpt-empty-value")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(samples.SHAREGPT),
                          "validation": datasets.Dataset.from_list(bad)}).save_to_disk(str(tmp_path / "saved"))
    train, valid = survey.survey(options(tmp_path / "saved"), tokenizer)[0]
    assert (train.label, train.fmt, train.checked, train.problems) == ("saved (train)", "sharegpt", 36, [])
    assert valid.label == "saved (valid)" and len(valid.problems) == 1
    assert valid.problems[0].startswith(f"saved dataset {tmp_path / 'saved'} split 'validation' row 4: turn 1")


def test_data_read_whole_is_checked_for_enough_documents_and_tokens_as_training_counts_them(tokenizer, tmp_path):
    samples.write_records(tmp_path / "few", "train", samples.SHAREGPT[:2], "jsonl")
    assert survey.survey(options(tmp_path / "few"), tokenizer, block_size=32)[1] == [
        "only 2 document(s), too few to hold out 5% for validation; add --valid-file, add text, or split .txt by "
        "line (--txt-split line)."]
    samples.write_records(tmp_path / "short", "train", samples.ALPACA, "jsonl")
    samples.write_records(tmp_path / "short", "valid", [{"instruction": "Hi.", "output": "Yo."}], "jsonl")
    assert survey.survey(options(tmp_path / "short"), tokenizer, block_size=32)[1] == [
        "the validation text has fewer than --block-size 32 tokens, so no full block can be made; add text, lower "
        "--block-size, or use --no-packing."]
    assert survey.survey(options(tmp_path / "short", packing=False), tokenizer, block_size=32)[1] == []
    assert survey.survey(options(tmp_path / "short"), tokenizer, block_size=8)[1] == []
    assert survey.survey(options(tmp_path / "short"), tokenizer, limit=10, block_size=32)[1] == []  # not read whole


def test_a_dataset_by_name_is_read_from_its_first_records_and_a_bad_one_named_by_split_and_record(tokenizer,
                                                                                                  tmp_path):
    from tests.support.datarepos import plain_repo

    good = plain_repo(tmp_path / "good", {"train": samples.SHAREGPT, "validation": samples.SHAREGPT[:2]})
    cfg = TrainConfig(dataset=(str(good),), data_dir=tmp_path / "absent", output_dir=tmp_path / "out")
    reports, problems = survey.survey(DataOptions.of(cfg), tokenizer)
    assert problems == [] and [(r.split, r.fmt, r.problems) for r in reports] == [("train", "sharegpt", []),
                                                                                  ("valid", "sharegpt", [])]
    assert reports[0].line() == f"sharegpt data from conversations; {len(samples.SHAREGPT)} records checked " \
                                "(all of them)"
    bad = plain_repo(tmp_path / "bad", {"train": samples.bad_records("sharegpt-unknown-role")})
    cfg = TrainConfig(dataset=(str(bad),), data_dir=tmp_path / "absent", output_dir=tmp_path / "out")
    (report,), _ = survey.survey(DataOptions.of(cfg), tokenizer)
    (problem,) = report.problems
    assert problem.startswith(f"--dataset {bad} split train record 4: ")


def test_renamed_preference_fields_are_reported_and_a_bad_pair_names_the_field(tokenizer, tmp_path):
    pairs = [{"question": f"Q{i}?\n", "good": f"Yes {i}.", "bad": f"No {i}."} for i in range(6)]
    pairs[3]["bad"] = pairs[3]["good"]
    path = samples.write_records(tmp_path / "data", "train", pairs, "jsonl")
    renamed = options(tmp_path / "data", prompt_field="question", chosen_field="good", rejected_field="bad")
    (report,), problems = survey.survey(renamed, tokenizer)
    assert problems == [] and report.line().startswith("preference data from question, good, bad;")
    assert report.problems == [f"{path} line 4: the answers in 'good' and 'bad' are the same text, so nothing is "
                               "preferred; give a different rejected answer or remove the record."]
