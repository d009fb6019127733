"""vocab stage: merge a Chinese SentencePiece model into the LLaMA tokenizer (real files) and
extend a tiny model's embeddings."""
from __future__ import annotations

import json

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from steps import vocab
from steps.checks import check_model
from steps.vocab import (compare_tokenizers, extend_model, has_cjk, merge_tokenizers, read_lines,
                         train_tokenizer)
from tests.tiny import DEMO_DATA, upstream_layout_tokenizer as _upstream_layout

POEM = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"


def _sp(path):
    return spm.SentencePieceProcessor(model_file=str(path))


# ------------------------------------------------------------------ real files: the merge

@pytest.fixture(scope="module")
def real(shared_data, tmp_path_factory):
    base = shared_data / "tokenizers" / "llama_tokenizer.model"
    extra = shared_data / "tokenizers" / "chinese_sp.model"
    root = tmp_path_factory.mktemp("merged")
    merged = {name: merge_tokenizers(base, extra, root / name, **kw) for name, kw in {
        "all": {}, "pad": {"pad_token": "[PAD]"}, "cjk": {"mode": "cjk"},
        "pad256": {"pad_token": "[PAD]", "pad_to_multiple_of": 256},
        "recipe": {"score_strategy": "zero"}}.items()}
    return dict(base=base, extra=extra, merged=merged,
                zh=read_lines(shared_data / "corpora" / "CLUECorpusSmall_sampled.txt"),
                en=read_lines(shared_data / "eval" / "wikitext-2-raw" / "wiki.test.raw"))


def test_real_merge_sizes_and_base_ids(real):
    base, merged = _sp(real["base"]), _sp(real["merged"]["all"] / "tokenizer.model")
    assert (base.get_piece_size(), merged.get_piece_size()) == (32000, 49953)
    assert len(AutoTokenizer.from_pretrained(str(real["merged"]["all"]))) == 49953
    for i in range(32000):  # every base piece keeps its id, score and type
        assert (merged.id_to_piece(i), merged.get_score(i), merged.is_byte(i), merged.is_control(i)) \
            == (base.id_to_piece(i), base.get_score(i), base.is_byte(i), base.is_control(i))
    # Appended pieces continue LLaMA's descending scores (last normal base score -31740).
    assert [merged.get_score(i) for i in (32000, 32001, 49952)] == [-31741.0, -31742.0, -49693.0]
    report = json.loads((real["merged"]["all"] / "vocab_report.json").read_text())
    assert (report["pieces_added"], report["duplicates"], report["skipped_special"]) == (17953, 2044, 3)

    assert len(base.encode(POEM)) == 37
    assert merged.encode(POEM, out_type=str) == [
        "▁白", "日", "依", "山", "尽", "，", "黄河", "入", "海", "流", "。", "欲", "穷", "千里",
        "目", "，", "更", "上", "一层", "楼", "。"]  # 21 tokens, as the recipe reports


def test_real_merge_pad_token_and_multiple(real):
    tok = AutoTokenizer.from_pretrained(str(real["merged"]["pad"]))
    assert (len(tok), tok.pad_token, tok.pad_token_id) == (49954, "[PAD]", 49953)
    assert _sp(real["merged"]["pad"] / "tokenizer.model").get_piece_size() == 49953

    tok = AutoTokenizer.from_pretrained(str(real["merged"]["pad256"]))
    sp = _sp(real["merged"]["pad256"] / "tokenizer.model")
    assert len(tok) == 50176 == 196 * 256 and sp.get_piece_size() == 50175
    assert tok.pad_token_id == 50175
    assert [sp.is_unused(i) for i in (49952, 49953, 50174)] == [False, True, True]
    assert sp.id_to_piece(49953) == "<unused0>"
    # the unused pieces never come out of encoding
    assert max(max(ids) for ids in sp.encode(real["zh"][:200] + real["en"][:200])) < 49953


def test_real_merge_chinese_fidelity_and_hf_parity(real):
    zh = compare_tokenizers(real["base"], real["merged"]["all"], real["zh"])
    en = compare_tokenizers(real["base"], real["merged"]["all"], real["en"])
    assert zh["roundtrip_failures"] == 0 and en["roundtrip_failures"] == 0
    assert (zh["base_tokens"], zh["merged_tokens"]) == (1001627, 457389)   # ratio 0.457
    assert zh["merged_tokens"] < 0.5 * zh["base_tokens"]
    # HF (AutoTokenizer on the saved files) == SentencePiece on EVERY line of both texts.
    assert zh["hf_sp_mismatch"] == 0.0 and en["hf_sp_mismatch"] == 0.0
    # mode "all" retokenizes English: chinese_sp brings Latin and digit pieces (see cjk mode)
    assert en["retokenized"] > 0.5


def test_recipe_score_zero_defect_is_measured(real):
    # The recipe's score-0 merge: same pieces, but HF and SentencePiece disagree on most Chinese
    # lines (ties in merge priority). This is what score_strategy="rank" fixes.
    zh = compare_tokenizers(real["base"], real["merged"]["recipe"], real["zh"])
    assert zh["hf_sp_mismatch"] > 0.5


def _recipe_merge(base_sp, extra_sp):
    """The recipe's merge_tokenizers.py, step for step: every chinese_sp piece LLaMA lacks is
    appended as a new SentencePiece with score 0 (type left at its default, NORMAL)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    llama, chinese = pb.ModelProto(), pb.ModelProto()
    llama.ParseFromString(_sp(base_sp).serialized_model_proto())
    chinese.ParseFromString(_sp(extra_sp).serialized_model_proto())
    llama_tokens = set(p.piece for p in llama.pieces)
    for p in chinese.pieces:
        if p.piece not in llama_tokens:
            new_p = pb.ModelProto().SentencePiece()
            new_p.piece = p.piece
            new_p.score = 0
            llama.pieces.append(new_p)
    return llama


def test_score_zero_is_the_recipes_tokenizer_and_rank_its_vocabulary(real):
    # score_strategy=zero must give the upstream merged tokenizer exactly; rank (the default)
    # keeps its pieces and ids and changes only the scores, hence some segmentations.
    from steps.tokenizer import load_sp_proto

    recipe = _recipe_merge(real["base"], real["extra"])
    zero = load_sp_proto(real["merged"]["recipe"] / "tokenizer.model")
    rank = load_sp_proto(real["merged"]["all"] / "tokenizer.model")
    pieces = lambda proto: [(p.piece, p.type) for p in proto.pieces]  # noqa: E731
    assert len(recipe.pieces) == 49953
    assert pieces(zero) == pieces(recipe) == pieces(rank)               # pieces, types and ids
    assert [p.score for p in zero.pieces] == [p.score for p in recipe.pieces]
    assert [p.score for p in rank.pieces[:32000]] == [p.score for p in recipe.pieces[:32000]]
    assert all(p.score < -31740 for p in rank.pieces[32000:])
    assert zero.normalizer_spec == recipe.normalizer_spec and zero.trainer_spec == recipe.trainer_spec

    upstream = spm.SentencePieceProcessor(model_proto=recipe.SerializeToString())
    ref = upstream.encode(real["zh"])
    assert _sp(real["merged"]["recipe"] / "tokenizer.model").encode(real["zh"]) == ref
    differ = sum(a != b for a, b in zip(_sp(real["merged"]["all"] / "tokenizer.model").encode(real["zh"]), ref))
    assert 0.55 < differ / len(ref) < 0.65                              # 1513 of 2500 CLUE lines
    # the stage's metric measures the same thing
    assert compare_tokenizers(real["base"], real["merged"]["all"], real["zh"])["differs_from_recipe"] \
        == differ / len(ref)
    assert compare_tokenizers(real["base"], real["merged"]["recipe"], real["zh"])["differs_from_recipe"] == 0
    for name, strategy in (("all", "rank"), ("recipe", "zero")):
        report = json.loads((real["merged"][name] / "vocab_report.json").read_text())
        assert report["score_strategy"] == strategy
        assert report["score_strategy_effect"] == vocab.SCORE_STRATEGY_EFFECT[strategy]
    assert "vocab.score_strategy=zero" in vocab.SCORE_STRATEGY_EFFECT["rank"]


def test_given_tokenizer_is_taken_as_it_is(real, tmp_path):
    """vocab.mode=given (Chinese-LLaMA-2's route: upstream ships its tokenizer): the file is
    copied byte for byte, HF gets the same pieces, <pad> is the piece already there."""
    given = _upstream_layout(real["base"], real["extra"], tmp_path / "given.model")
    out = vocab.take_tokenizer(real["base"], given, tmp_path / "tok", pad_token="<pad>")
    assert (out / "tokenizer.model").read_bytes() == given.read_bytes()
    sp, tok = _sp(given), AutoTokenizer.from_pretrained(str(out))
    assert sp.get_piece_size() == len(tok) == 49954          # 32000 + <pad> + 17953
    assert (tok.pad_token, tok.pad_token_id) == ("<pad>", 32000)
    assert tok(POEM, add_special_tokens=False)["input_ids"] == sp.encode(POEM)
    report = json.loads((out / "vocab_report.json").read_text())
    assert (report["mode"], report["base_pieces"], report["pieces_added"],
            report["tokenizer_size"]) == ("given", 32000, 17954, 49954)
    with pytest.raises(ValueError, match="49954 tokens.*multiple of vocab.pad_to_multiple_of=256"):
        vocab.take_tokenizer(real["base"], given, tmp_path / "tok256", pad_to_multiple_of=256)


def test_given_tokenizer_that_does_not_extend_the_base_is_refused(real, tmp_path):
    from steps.tokenizer import load_sp_proto

    with pytest.raises(ValueError, match=r"chinese_sp.model: 20000 pieces, fewer than the base's "
                                         r"32000.*vocab.mode=all with vocab.extra_sp"):
        vocab.check_extends(real["base"], real["extra"])
    proto = load_sp_proto(_upstream_layout(real["base"], real["extra"], tmp_path / "g.model"))
    proto.pieces[100].piece, proto.pieces[101].piece = proto.pieces[101].piece, proto.pieces[100].piece
    (tmp_path / "swapped.model").write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError, match=r"swapped.model: id 100 is .*the base's is"):
        vocab.check_extends(real["base"], tmp_path / "swapped.model")


def test_cjk_mode_leaves_english_alone(real):
    base, cjk = _sp(real["base"]), _sp(real["merged"]["cjk"] / "tokenizer.model")
    en = real["en"]
    changed = [l for l, a, b in zip(en, base.encode(en), cjk.encode(en)) if a != b]
    # only lines holding CJK characters (11 of the 14 wikitext lines with any) change
    assert all(has_cjk(l) for l in changed) and len(changed) == 11
    assert sum(has_cjk(l) for l in en) == 14
    stats = compare_tokenizers(real["base"], real["merged"]["cjk"], real["zh"])
    assert stats["merged_tokens"] < 0.5 * stats["base_tokens"] and stats["hf_sp_mismatch"] == 0
    assert compare_tokenizers(real["base"], real["merged"]["cjk"], en)["hf_sp_mismatch"] == 0


def test_not_a_sentencepiece_model_fails_naming_the_file(real, tmp_path):
    bad = tmp_path / "chinese.model"
    bad.write_bytes(b"\x00not a model" * 50)
    with pytest.raises(ValueError, match="chinese.model"):
        merge_tokenizers(real["base"], bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ training a tokenizer

def test_train_tokenizer_on_a_directory_of_txt_and_jsonl(tmp_path):
    data = tmp_path / "corpus"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text((DEMO_DATA / "corpus_zh.txt").read_text(encoding="utf-8"),
                                encoding="utf-8")
    records = [{"text": "量子纠缠实验室 " + line} for line in read_lines(DEMO_DATA / "eval_zh.txt")]
    (data / "sub" / "b.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) * 3, encoding="utf-8")
    (data / "ignored.csv").write_text("鲸鲸鲸鲸,x\n")
    model = train_tokenizer(data, tmp_path / "tok", vocab_size=500, num_threads=1)
    sp = _sp(model)
    assert sp.get_piece_size() == 500
    assert sp.id_to_piece([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert sp.piece_to_id("纠") != 0       # a character only the .jsonl file holds
    assert sp.piece_to_id("鲸") == 0       # .csv files are not read
    text = "清晨的河水流过老磨坊。"
    assert sp.decode(sp.encode(text)) == text

    (data / "bad.jsonl").write_text('{"content": "no text field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        train_tokenizer(data, tmp_path / "tok2", vocab_size=500, num_threads=1)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train_tokenizer(tmp_path / "nowhere", tmp_path / "tok3", vocab_size=400)


# ------------------------------------------------------------------ extending a tiny model

@pytest.fixture(scope="module")
def tiny_merged(tiny_sp_model, tmp_path_factory):
    """The tiny English tokenizer (320) + a 450-piece Chinese model trained on the demo corpus."""
    root = tmp_path_factory.mktemp("tiny_merged")
    extra = train_tokenizer(DEMO_DATA / "corpus_zh.txt", root / "extra", 450, num_threads=1)
    return merge_tokenizers(tiny_sp_model, extra, root / "merged", pad_token="[PAD]")


@pytest.fixture(scope="module")
def extended(tiny_hf_model, tiny_merged, tmp_path_factory):
    root = tmp_path_factory.mktemp("extended")
    return {init: extend_model(tiny_hf_model, tiny_merged, root / init, init=init, seed=0)
            for init in ("mean", "subword_mean", "normal")}


def test_extend_model_old_rows_and_sizes(tiny_hf_model, tiny_merged, extended):
    old = load_file(str(tiny_hf_model / "model.safetensors"))
    n_tok = len(AutoTokenizer.from_pretrained(str(tiny_merged)))
    assert n_tok > 320 + 300
    for init, out in extended.items():
        new = load_file(str(out / "model.safetensors"))
        assert list(new) == list(old)  # same tensors in the same order
        for name, t in old.items():
            if name.endswith(("embed_tokens.weight", "lm_head.weight")):
                assert new[name].shape == (n_tok, t.shape[1])
                assert torch.equal(new[name][:320], t), (init, name)  # bit-identical
            else:
                assert torch.equal(new[name], t), (init, name)
        sizes = check_model(out)
        assert sizes.config == sizes.embed_rows == sizes.lm_head_rows == sizes.tokenizer == n_tok
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["vocab_size"] == n_tok and cfg["pad_token_id"] == n_tok - 1
        assert (out / "tokenizer.model").read_bytes() == (tiny_merged / "tokenizer.model").read_bytes()
        assert (out / "generation_config.json").is_file()


def test_extend_model_logits_unchanged_on_old_vocab(tiny_hf_model, extended):
    ids = torch.tensor([[1, 5, 77, 203, 319, 42, 260, 3]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(tiny_hf_model)).eval()(ids).logits
        for out in extended.values():
            got = AutoModelForCausalLM.from_pretrained(str(out)).eval()(ids).logits
            assert (got[..., :320] - ref).abs().max().item() <= 1e-5


def test_extend_model_init_strategies(tiny_hf_model, tiny_sp_model, tiny_merged, extended):
    old = load_file(str(tiny_hf_model / "model.safetensors"))
    merged = _sp(tiny_merged / "tokenizer.model")
    n_tok = len(AutoTokenizer.from_pretrained(str(tiny_merged)))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = old[name]
        mean = load_file(str(extended["mean"] / "model.safetensors"))[name]
        assert torch.allclose(mean[320:], w.mean(0).expand(n_tok - 320, -1), atol=1e-6)

        sub = load_file(str(extended["subword_mean"] / "model.safetensors"))[name]
        base = _sp(tiny_sp_model)
        checked = 0
        for i in range(320, merged.get_piece_size()):
            piece = merged.id_to_piece(i)
            if piece.startswith("▁") and len(piece) > 1:
                # the base tokenizer's own split of "▁X" is its encoding of "X"
                parts = base.encode(piece[1:])
                assert torch.allclose(sub[i], w[parts].mean(0), atol=1e-6), (name, piece, parts)
                checked += 1
        assert checked >= 1
        # Chinese characters are not in the English base vocabulary: it splits a CJK piece into
        # the byte pieces of its UTF-8 encoding.
        for i in range(320, merged.get_piece_size()):
            piece = merged.id_to_piece(i)
            if all(has_cjk(c) for c in piece):
                parts = [base.piece_to_id(f"<0x{b:02X}>") for b in piece.encode("utf-8")]
                assert torch.allclose(sub[i], w[parts].mean(0), atol=1e-6), (name, piece, parts)
                checked += 1
        assert checked >= 300
        assert torch.allclose(sub[n_tok - 1], w.mean(0), atol=1e-6)  # [PAD]: no pieces -> mean

        normal = load_file(str(extended["normal"] / "model.safetensors"))[name]
        rows = normal[320:]
        assert abs(rows.mean().item()) < 0.002 and abs(rows.std().item() - 0.02) < 0.002
        assert not torch.allclose(normal[320:], normal[320:].mean(0))


def test_extend_model_normal_is_seeded(tiny_hf_model, tiny_merged, extended, tmp_path):
    again = extend_model(tiny_hf_model, tiny_merged, tmp_path / "a", init="normal", seed=0)
    other = extend_model(tiny_hf_model, tiny_merged, tmp_path / "b", init="normal", seed=1)
    ref = (extended["normal"] / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == ref
    assert (other / "model.safetensors").read_bytes() != ref


def test_extend_model_bad_inputs_name_the_file(tiny_hf_model, tiny_merged, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tok / f).write_bytes((tiny_merged / f).read_bytes())
    with pytest.raises(FileNotFoundError, match=str(tok / "tokenizer.model")):
        extend_model(tiny_hf_model, tok, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="config.json"):
        extend_model(tmp_path, tiny_merged, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the stage

def test_run_stage_on_tiny_model(tiny_hf_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    config = vocab.Config(corpus=[DEMO_DATA / "corpus_zh.txt"], vocab_size=450, num_threads=1,
                          pad_token="[PAD]", pad_to_multiple_of=64, init="subword_mean",
                          eval_zh=DEMO_DATA / "eval_zh.txt", eval_en=DEMO_DATA / "eval_en.txt")
    metrics = vocab.run(config, out, model=tiny_hf_model)
    assert metrics["base_vocab"] == 320 and metrics["merged_vocab"] % 64 == 0
    assert metrics["embedding_rows"] == metrics["merged_vocab"] > metrics["merged_pieces"]
    assert metrics["pieces_added"] > 300
    assert metrics["tokens_per_char_zh_merged"] < 0.5 * metrics["tokens_per_char_zh_base"]
    assert metrics["hf_sp_mismatch_lines_zh"] == metrics["hf_sp_mismatch_lines_en"] == 0
    assert 0 <= metrics["differs_from_recipe_lines_zh"] <= 1
    report = json.loads((out / "vocab_report.json").read_text())
    assert report["score_strategy"] == "rank" and "eval_zh" in report
    assert all(isinstance(v, (int, float, str)) for v in metrics.values())
    assert not (out / "_work").exists() and (out / "vocab_report.json").is_file()
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer.json",
            "extra_sp.model"} <= {p.name for p in out.iterdir()}
    check_model(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = tok("清晨的河水", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == metrics["merged_vocab"]


def test_run_with_the_recipes_scores_records_it(tiny_hf_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    config = vocab.Config(corpus=[DEMO_DATA / "corpus_zh.txt"], vocab_size=450, num_threads=1,
                          score_strategy="zero", eval_zh=DEMO_DATA / "eval_zh.txt")
    metrics = vocab.run(config, out, model=tiny_hf_model)
    assert metrics["differs_from_recipe_lines_zh"] == 0     # it is the recipe's segmentation
    report = json.loads((out / "vocab_report.json").read_text())
    assert report["score_strategy"] == "zero"
    assert report["score_strategy_effect"] == vocab.SCORE_STRATEGY_EFFECT["zero"]


def test_run_with_a_given_tokenizer(tiny_hf_model, tiny_merged, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    given = tiny_merged / "tokenizer.model"
    metrics = vocab.run(vocab.Config(mode="given", tokenizer=given, pad_token="[PAD]",
                                     eval_zh=DEMO_DATA / "eval_zh.txt"), out, model=tiny_hf_model)
    assert (out / "tokenizer.model").read_bytes() == given.read_bytes()
    n = len(AutoTokenizer.from_pretrained(str(tiny_merged)))
    assert metrics["merged_vocab"] == metrics["embedding_rows"] == n
    assert metrics["tokens_per_char_zh_merged"] < 0.5 * metrics["tokens_per_char_zh_base"]
    old = load_file(str(tiny_hf_model / "model.safetensors"))["model.embed_tokens.weight"]
    new = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    assert new.shape[0] == n and torch.equal(new[:old.shape[0]], old)
    assert not (out / "extra_sp.model").exists() and not (out / "_work").exists()
    with pytest.raises(ValueError, match="vocab.mode=given: set vocab.tokenizer"):
        vocab.run(vocab.Config(mode="given"), tmp_path / "x", model=tiny_hf_model)


def test_run_rejects_a_bad_extra_sp_before_work(tiny_hf_model, tmp_path):
    bad = tmp_path / "zh.model"
    bad.write_text("not a sentencepiece model")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="zh.model"):
        vocab.run(vocab.Config(extra_sp=bad), out, model=tiny_hf_model)
    with pytest.raises(ValueError, match="extra_sp.*corpus"):
        vocab.run(vocab.Config(), out, model=tiny_hf_model)
    assert list(out.iterdir()) == []


def test_conf_mirrors_config():
    import yaml

    from tests.tiny import DEMO_DATA as demo

    conf = yaml.safe_load((demo.parents[1] / "conf" / "vocab" / "default.yaml").read_text())
    assert conf == vocab.Config().model_dump(mode="json")
    assert set(vocab.DATA_FIELDS) <= set(conf)
