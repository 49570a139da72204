"""Build modelyard's built-in demo models: small random-weight Llamas that vLLM can serve.

Why: tests and demos need a real vLLM server without a GPU or a model hub. Offline, in seconds
and byte for byte the same each run, this writes a Hugging Face folder holding a byte-level BPE
tokenizer (trained with `tokenizers` on a seeded corpus of English words, digits and JSON
punctuation; <s>/</s>/<pad>; Jinja chat template) and a seeded random LlamaForCausalLM (hidden
256, 2 layers, 4 heads, 2 KV heads, head_dim 64, intermediate 512, 4096 positions, bfloat16).
Purely random logits are nearly uniform: under a JSON grammar it wrote raw control bytes in
strings and endless integers (3/20 parsed). So residual channel 0 is held constant and its
lm_head column acts as a logit bias: no control or broken UTF-8 tokens, JSON closers and '"'
favoured, digits not. The text is gibberish by design; it exercises serving, not quality.

`--size small` builds builtin:small-llama, a second model for cascades and votes offline: the
same tokenizer and recipe, other weights (seed 1) and about four times the parameters (hidden
512, 3 layers, 8 heads, 2 KV heads, intermediate 1024).

Usage (ENGINE python): python build_tiny_llama.py OUT_DIR [--size tiny|small]. Built in OUT_DIR.tmp-<pid>, then
renamed, so a crash never leaves a half model. OUT_DIR/modelyard-build.json marks a finished
build (then it exits 0 at once): {"recipe_version": 1, "revision": R}, R = first 16 hex of
sha256 over the other files' contents in sorted name order. R is printed last.
"""
import hashlib, json, os, random, shutil, sys

RECIPE_VERSION = 1
MARKER = "modelyard-build.json"
WORDS = """the a an and or but of to in on for with from by at as is are was be it this that billing
bug feature other product urgent count name price total order refund invoice account customer
support ticket issue error crash slow login password payment charge card email phone widget
gadget laptop printer router camera monitor keyboard mouse cable battery screen app hello world
yes no maybe true false null good bad new old fast big small red green blue black please help
need want cannot does not work broken fixed thanks today tomorrow week month year summary label
category answer question reason result score status priority high low medium user assistant
system message content role text data value key list item type string number sentiment happy
positive negative neutral angry sad review rating star shipping delivery late""".split()
PUNCT = list("{}[]\":,.-_!?'()/;=+*#@%&") + ["\\n", "\\\"", "\\\\"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
                 "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def corpus(rng):
    """480 varied lines: sentences, numbers, JSON objects and arrays, chat turns."""
    lines = []
    for i in range(480):
        w = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        obj = {k: rng.choice([rng.randint(-999, 99999), rng.random() < 0.5, None, " ".join(w[:3]),
                              [rng.randint(0, 99), k]]) for k in w[:4]}
        lines.append([
            " ".join(w).capitalize() + rng.choice(".!?"),
            " ".join(str(rng.randint(0, 10 ** rng.randint(1, 6))) for _ in range(6)),
            json.dumps(obj, separators=(",", ":") if i % 12 else (", ", ": ")),
            json.dumps(w[:5]) + " " + "".join(rng.choice(PUNCT) for _ in range(8)),
            f"<|{rng.choice(['system', 'user', 'assistant'])}|> " + " ".join(w),
            f'{{"{w[0]}": "{w[1].upper()}", "id": {i}, "ok": {str(i % 4 == 0).lower()}}}'][i % 6])
    return lines


def build_tokenizer(rng):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, min_frequency=2, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(rng), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=4096, chat_template=CHAT_TEMPLATE)


SIZES = {  # hidden, intermediate, layers, attention heads, weight seed
    "tiny": (256, 512, 2, 4, 0),
    "small": (512, 1024, 3, 8, 1),
}


def build_model(tokenizer, size="tiny"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden_size, intermediate, layers, heads, seed = SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    bias = torch.zeros(config.vocab_size)
    for tid in range(config.vocab_size):
        text = tokenizer.decode([tid])
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in text) or "\ufffd" in text:
            bias[tid] = -30.0  # raw control characters and partial UTF-8 bytes
        elif text and all(ch in '"{}[],:' for ch in text):
            bias[tid] = 2.0  # JSON structure: strings, numbers and objects get closed
        elif text.isdigit():
            bias[tid] = -2.0  # so integers end
    bias[[tokenizer.bos_token_id, tokenizer.pad_token_id]] = -30.0
    bias[tokenizer.convert_tokens_to_ids('"')] = 5.0  # free-text strings end too
    bias[tokenizer.eos_token_id] = 1.0
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0  # channel 0 is constant: no layer writes it
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        ids = torch.tensor([tokenizer("hello world {} 123").input_ids])
        hidden = model.model(ids).last_hidden_state[0, :, 0].mean()  # its normed value, ~7
        model.lm_head.weight[:, 0] = bias / hidden
    return model.to(torch.bfloat16)


def revision(folder):
    h = hashlib.sha256()
    for name in sorted(set(os.listdir(folder)) - {MARKER}):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def main(out_dir, size="tiny"):
    out_dir = os.path.abspath(out_dir)
    marker = os.path.join(out_dir, MARKER)
    read_rev = lambda: json.load(open(marker))["revision"]  # noqa: E731
    if os.path.isfile(marker):
        return print(read_rev())  # already built: nothing to do
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        sys.exit(f"{out_dir} exists, is not empty and has no {MARKER}: refusing to overwrite it")
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    try:
        tokenizer = build_tokenizer(random.Random(20240601))
        tokenizer.save_pretrained(tmp)
        build_model(tokenizer, size).save_pretrained(tmp, safe_serialization=True)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)  # safetensors writes 0600
        rev = revision(tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"recipe_version": RECIPE_VERSION, "revision": rev}, f)
        try:
            os.replace(tmp, out_dir)  # atomic; succeeds onto a missing or empty directory
        except OSError:
            if not os.path.isfile(marker):  # a concurrent build that won the race is fine
                raise
            rev = read_rev()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(rev)


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) == 3 and args[1] == "--size" and args[2] in SIZES:
        main(args[0], args[2])
    elif len(args) == 1:
        main(args[0])
    else:
        sys.exit("usage: python build_tiny_llama.py OUT_DIR [--size tiny|small]")
