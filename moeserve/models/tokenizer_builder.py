"""A small byte-level BPE tokenizer trained, deterministically, from text shipped in this file.

moeserve must run with no network and no downloaded model, so the built-in and benchmark
checkpoints carry a tokenizer built here. Byte-level BPE covers every byte, so any input
(accents, CJK, emoji) encodes without <unk>; the corpus mixes scripts so that multi-byte
characters also appear as merged tokens and incremental detokenization gets exercised.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Order fixes the ids: <unk>=0, <s>=1, </s>=2, <pad>=3, <|im_start|>=4, <|im_end|>=5.
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IM_START, IM_END)

# ChatML. String content or OpenAI-style content parts (only "text" parts are rendered).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.
It was a bright cold day in April, and the clocks were striking thirteen. She opened the window,
looked at the grey sky over the harbour and decided that the boats would not sail today.
When the train finally arrived, forty minutes late, nobody complained; everyone simply climbed
aboard, found a seat, and opened a book or a newspaper. The conductor smiled and said "Good morning!"
Cooking rice is easy: rinse one cup of rice, add two cups of water and a pinch of salt, bring it to
a boil, then cover the pot and simmer for eighteen minutes. Let it rest before serving.
To bake bread you need flour, water, yeast and salt. Knead the dough for ten minutes, let it rise
for an hour, shape it into a loaf and bake it at 220 degrees Celsius for about 35 minutes.
In 1969, Apollo 11 landed on the Moon. Neil Armstrong and Buzz Aldrin walked on the surface while
Michael Collins orbited above. The mission lasted 8 days, 3 hours, 18 minutes and 35 seconds.
Water boils at 100 degrees Celsius at sea level. Light travels at about 299,792 kilometres per
second. The Earth is roughly 4.54 billion years old, and the Sun is a G-type main-sequence star.
Photosynthesis converts carbon dioxide and water into glucose and oxygen using energy from light.
A mixture of experts model routes every token to a few experts chosen by a small gating network.
Each expert is a feed-forward network; the router computes a softmax over the experts, keeps the
top two, and sums their outputs weighted by the renormalised probabilities.
Large language models generate text one token at a time. The server batches many requests
together, stores keys and values in a paged cache, and streams tokens back as they are produced.
system: You are a helpful assistant. user: Hello, world! assistant: Hello! How can I help you today?
user: Tell me a short story about a robot. assistant: Once upon a time, a small robot learned to paint.
Q: What is the capital of France? A: Paris. Q: How many legs does a spider have? A: Eight.
Q: Who wrote "Pride and Prejudice"? A: Jane Austen, in 1813. Q: What is 12 times 12? A: 144.
"Can you help me with my homework?" asked the student. "Of course," replied the teacher, "but you
must try the first problem yourself." They worked together until the library closed at nine.
Dear Sir or Madam, thank you for your letter of 3 March. I am writing to confirm our meeting on
Tuesday at 10:30 a.m. Please let me know if this time is not convenient. Yours faithfully, Anna.
The weather forecast for tomorrow: cloudy in the morning, sunny spells in the afternoon, with a
high of 21 degrees and a light breeze from the west. There is a 20% chance of rain at night.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. January, February, March, April,
May, June, July, August, September, October, November, December. Spring, summer, autumn, winter.
one two three four five six seven eight nine ten eleven twelve hundred thousand million billion
red orange yellow green blue indigo violet black white grey brown pink purple silver gold
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(f"fib({i}) = {fibonacci(i)}")
{"model": "moeserve", "messages": [{"role": "user", "content": "Hello!"}], "stream": true}
SELECT name, price FROM products WHERE price > 10 ORDER BY price DESC LIMIT 5;
https://example.com/docs/index.html?page=2&lang=en#section-3 user@example.org +1 (555) 010-9999
Le café est très bon ici, mais la crème brûlée est encore meilleure. Où est la gare, s'il vous plaît?
Über den Wolken muss die Freiheit wohl grenzenlos sein. Die Straße ist schön und grün.
El niño comió una manzana. ¿Dónde está la biblioteca? ¡Qué día tan bonito! Mañana será otro día.
A canção é linda e o coração está cheio de alegria. Ação, emoção, informação, não.
Tiếng Việt có nhiều dấu: ă, â, ê, ô, ơ, ư, đ. Xin chào, bạn khỏe không?
Привет, как дела? Москва — столица России. Я люблю читать книги.
Καλημέρα! Η Ελλάδα είναι όμορφη χώρα. Αλφα, βήτα, γάμμα, δέλτα.
こんにちは、世界。今日はいい天気ですね。東京は日本の首都です。ありがとうございます。
你好，世界。今天天气很好。北京是中国的首都。我喜欢学习新的语言。谢谢你的帮助。
안녕하세요, 세계. 오늘 날씨가 좋네요. 서울은 한국의 수도입니다. 감사합니다.
مرحبا بالعالم. كيف حالك اليوم؟ שלום עולם. नमस्ते दुनिया, आप कैसे हैं?
Emoji: 😀 😂 🥲 😍 🤔 👍 👋 🎉 🚀 🌍 🔥 ❤️ ✅ ⭐ 🍕 🐍 🤖 🧠 — naïve façade, coöperate, résumé, jalapeño.
Math: α + β = γ, ∑ x² ≤ ∞, π ≈ 3.14159, √2 ≈ 1.41421, 5 € ≈ 5.4 $ ≈ 4.3 £ ≈ 800 ¥, ±0.5 °C.
"""


def train_bpe(vocab_size: int) -> Tokenizer:
    """Train the byte-level BPE on CORPUS. The result may hold fewer than vocab_size tokens:
    training stops once every word of the corpus is a single token."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} cannot hold the 256 bytes and special tokens")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes up front (sorted, so their ids do not depend on the corpus order).
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()),
        show_progress=False,
    )
    # Ties between equally frequent pairs are broken by pair ids, so training is deterministic.
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return tok


def build_tokenizer(vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A transformers tokenizer with the special tokens and the ChatML chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(vocab_size),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )


def eos_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids that end generation: </s> for plain completions and <|im_end|> for chat turns."""
    return [tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(IM_END)]
