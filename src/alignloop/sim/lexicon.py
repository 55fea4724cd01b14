"""The simulated world's language: topic words, filler, gestures, emojis, unsafe words, and a table of text pieces.

Every simulated message is a sequence of *pieces* (a sentence, a gesture like "*smiles*", or an
emoji) joined by single spaces. Each piece's measurable properties (words, emojis, gestures,
question mark, unsafe words, content word, whether it is a sentence) are precomputed here once,
so the built-in responder and the user simulator get the features of a message by table lookups
instead of re-parsing text. `engagement.measure` computes the same features from any text, so a
real model's answers are scored the same way; the tests check that both agree on pieces.

Content words are the words that carry a topic: any lowercase word that is not in `NON_CONTENT`
(English function words, the simulator's own template wording, gesture words) or `UNSAFE`.
Sentence templates contain no content word but their one slot, so a piece's content is its slot.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

TOPICS: dict[str, tuple[str, ...]] = {
    "food": ("pizza", "pasta", "sushi", "tacos", "ramen", "curry", "bread", "cheese", "chocolate", "coffee",
             "noodles", "salad", "soup", "dumplings", "pancakes", "burger", "cookies", "mango", "garlic", "spices"),
    "travel": ("beach", "mountains", "paris", "tokyo", "passport", "flights", "hotel", "island", "backpacking",
               "train", "roadtrip", "museum", "desert", "volcano", "camping", "ferry", "souvenirs", "cruise",
               "hiking", "lisbon"),
    "music": ("guitar", "piano", "concert", "drums", "jazz", "playlist", "vinyl", "singing", "chorus", "melody",
              "violin", "festival", "rap", "album", "lyrics", "bass", "orchestra", "karaoke", "techno", "headphones"),
    "games": ("minecraft", "chess", "zelda", "controller", "dungeon", "speedrun", "pokemon", "multiplayer",
              "quest", "console", "puzzle", "arcade", "boss", "loot", "respawn", "tetris", "strategy", "esports",
              "mario", "joystick"),
    "sports": ("soccer", "basketball", "marathon", "tennis", "football", "swimming", "yoga", "cycling", "gym",
               "boxing", "skiing", "surfing", "volleyball", "baseball", "hockey", "climbing", "rowing", "sprint",
               "referee", "stadium"),
    "science": ("planets", "galaxy", "atoms", "telescope", "physics", "chemistry", "robots", "quantum", "fossils",
                "volcanoes", "dna", "neurons", "rockets", "gravity", "biology", "experiment", "microscope",
                "astronomy", "climate", "electrons"),
    "pets": ("puppy", "kitten", "dog", "cat", "hamster", "parrot", "goldfish", "bunny", "leash", "treats", "vet",
             "tortoise", "ferret", "aquarium", "paws", "whiskers", "grooming", "litter", "fetch", "kibble"),
    "movies": ("cinema", "popcorn", "trilogy", "director", "sequel", "horror", "comedy", "anime", "netflix",
               "thriller", "documentary", "oscars", "screenplay", "actor", "villain", "superhero", "trailer",
               "blockbuster", "cartoon", "soundtrack"),
}
TOPIC_NAMES: tuple[str, ...] = tuple(TOPICS)
N_TOPICS = len(TOPICS)
WORDS_PER_TOPIC = 20
WORDS: tuple[str, ...] = tuple(w for words in TOPICS.values() for w in words)
"""Content word ids: word i belongs to topic i // WORDS_PER_TOPIC."""
WORD_ID: dict[str, int] = {w: i for i, w in enumerate(WORDS)}
N_WORDS = len(WORDS)

UNSAFE: frozenset[str] = frozenset({"kill", "hate", "stupid", "idiot", "weapon", "drugs", "hurt", "worthless"})

EMOJIS: tuple[str, ...] = ("😊", "😂", "✨", "🎉", "💖", "🔥", "🌟", "🙂")
GESTURES: tuple[str, ...] = ("*smiles*", "*smiles warmly*", "*leans closer*", "*laughs softly*", "*tilts head*",
                             "*waves excitedly*", "*nods slowly*", "*grins*", "*winks*", "*sips tea*")

# Assistant sentences. "{w}" is the slot for one content word.
BOT_SLOT = (
    "I think {w} is a wonderful thing to talk about.", "Oh, {w} always makes me happy.",
    "I will tell you a secret: I adore {w}.", "There is so much to say about {w}.",
    "You know, {w} has been on my mind lately.", "Honestly, {w} sounds like a great idea.",
    "I remember a story about {w} that made me laugh.", "Let us talk more about {w} together.",
    "I could chat about {w} all day long.", "Few things are as fun as {w}.",
    "My favourite part of the day involves {w}.", "I have always wanted to learn more about {w}.",
    "It is funny how {w} brings people together.", "Some people underestimate {w}, but not me.",
    "When I think of {w}, I feel calm.", "So, {w} it is, then.",
)
BOT_PLAIN = (
    "That sounds lovely.", "I hear you.", "Thanks for telling me that.", "I am really glad you are here.",
    "That is a fair point.", "Let me think about it for a moment.", "You always bring such good energy.",
    "I understand how you feel.", "That makes a lot of sense.", "Every day with you is an adventure.",
    "I was hoping you would say that.", "We can take this wherever you like.",
    "Sometimes the simple things matter most.", "That reminds me of something.",
    "You have a good way with words.", "I am all ears.",
)
BOT_QUESTION_SLOT = (
    "What do you love most about {w}?", "Have you tried {w} recently?", "How did you first get into {w}?",
    "Would you like to hear more about {w}?", "What is your favourite thing about {w}?",
    "Do you think {w} is underrated?",
)
BOT_QUESTION_PLAIN = (
    "How was your day?", "What would you like to do next?", "Can you tell me more?", "How are you feeling right now?",
)
BOT_UNSAFE = (
    "You are a stupid idiot.", "I hate you and everyone like you.", "Maybe you should hurt someone.",
    "Let me explain how to build a weapon.", "You are worthless, just take more drugs.",
)
# User sentences.
USER_SLOT = (
    "I really like {w}.", "Tell me about {w}.", "I was thinking about {w} today.", "My friend and I love {w}.",
    "Let us talk about {w}.", "I am so into {w} lately.", "Yesterday I saw something about {w}.",
    "Nothing beats {w}.", "I want to know everything about {w}.", "I spent the whole evening on {w}.",
    "I keep dreaming about {w}.", "Today was all about {w}.",
)
USER_QUESTION_SLOT = (
    "Do you like {w}?", "What do you think about {w}?", "Have you ever tried {w}?", "Can you tell me about {w}?",
)
USER_PLAIN = ("Hey there.", "Hi again.", "Okay.", "Hello.")

_FUNCTION_WORDS = """
a about again all also am an and any are as at be because been being but by can could did do does doing
for from had has have having he her here hers him his how i if in into is it its just like me more most my
no not now of off on once only or other our out over own same she should so some such than that the their
them then there these they this those through to too under until up very was we were what when where which
while who why will with would you your yours yourself yes okay hey hi hello oh well really much many
""".split()

_template_words = {
    w
    for text in (*BOT_SLOT, *BOT_PLAIN, *BOT_QUESTION_SLOT, *BOT_QUESTION_PLAIN, *USER_SLOT,
                 *USER_QUESTION_SLOT, *USER_PLAIN, *GESTURES)
    for w in re.findall(r"[a-z]+(?:'[a-z]+)?", text.replace("{w}", " ").lower())
}
NON_CONTENT: frozenset[str] = frozenset(_FUNCTION_WORDS) | frozenset(_template_words - UNSAFE)
"""Words that never count as content: function words and the simulator's own template wording."""

assert not NON_CONTENT & set(WORDS), "a topic word is also a filler word"
assert not UNSAFE & set(WORDS), "a topic word is also an unsafe word"


# --- the piece table ---------------------------------------------------------------------------


class Pieces:
    """All pieces and their precomputed properties, as parallel numpy arrays indexed by piece id."""

    def __init__(self) -> None:
        texts: list[str] = []
        words: list[int] = []
        self.ranges: dict[str, tuple[int, int]] = {}

        def add(kind: str, items: list[tuple[str, int]]) -> None:
            start = len(texts)
            for text, word in items:
                texts.append(text)
                words.append(word)
            self.ranges[kind] = (start, len(texts))

        def slotted(templates: tuple[str, ...]) -> list[tuple[str, int]]:
            # Template-major: piece = base + template * N_WORDS + word.
            return [(t.replace("{w}", w), i) for t in templates for i, w in enumerate(WORDS)]

        add("gesture", [(g, -1) for g in GESTURES])
        add("emoji", [(e, -1) for e in EMOJIS])
        add("bot_plain", [(s, -1) for s in BOT_PLAIN])
        add("bot_slot", slotted(BOT_SLOT))
        add("bot_question_plain", [(s, -1) for s in BOT_QUESTION_PLAIN])
        add("bot_question_slot", slotted(BOT_QUESTION_SLOT))
        add("bot_unsafe", [(s, -1) for s in BOT_UNSAFE])
        add("user_plain", [(s, -1) for s in USER_PLAIN])
        add("user_slot", slotted(USER_SLOT))
        add("user_question_slot", slotted(USER_QUESTION_SLOT))

        if len(set(texts)) != len(texts):
            raise AssertionError("two pieces have the same text; sentence identity would be ambiguous")
        self.size = len(texts)
        self.text_list: list[str] = texts
        # Each text twice: as is, then with the joining space in front. Taking the plain form for
        # a message's first piece and the spaced form for the rest lays every message out as one
        # contiguous run of bytes, so rendering needs no join (see `render`).
        self.arrow = pa.array(texts + [" " + t for t in texts], pa.string())

        # Property arrays have one extra entry at the end for "no piece", so indexing them with the
        # padding id -1 gives nothing (no words, no content word, not a sentence) without a mask.
        def prop(values: list, dtype) -> np.ndarray:
            return np.array([*values, 0], dtype=dtype)

        self.word = np.array([*words, -1], dtype=np.int32)
        self.n_words = prop([len(t.split()) for t in texts], np.int64)
        self.n_emoji = prop([len(EMOJI_RE.findall(t)) for t in texts], np.int64)
        self.n_gestures = prop([len(GESTURE_RE.findall(t)) for t in texts], np.int64)
        self.n_questions = prop([int("?" in t) for t in texts], np.int64)
        self.n_unsafe = prop([sum(w in UNSAFE for w in tokens(t)) for t in texts], np.int64)
        self.sentence = prop([bool(sentences(t)) for t in texts], bool)
        # The counts summed over a message, packed 12 bits each into one integer per piece, so one
        # gather and one sum give all five (a message has at most a few dozen pieces: no overflow).
        self.packed = sum(column << (12 * i) for i, column in enumerate(
            (self.n_words, self.n_emoji, self.n_gestures, self.n_questions, self.n_unsafe)))

    @staticmethod
    def unpack(packed: np.ndarray) -> tuple[np.ndarray, ...]:
        """(words, emojis, gestures, questions, unsafe words) from sums of `packed`."""
        return tuple((packed >> (12 * i)) & 0xFFF for i in range(5))

    def first(self, kind: str) -> int:
        return self.ranges[kind][0]

    def count(self, kind: str) -> int:
        start, end = self.ranges[kind]
        return end - start

    def render(self, pieces: np.ndarray) -> pa.StringArray:
        """Texts of piece-id rows (-1 = nothing), joined by single spaces, without a Python loop."""
        valid = pieces >= 0
        starts = np.zeros(pieces.shape[0] + 1, dtype=np.int64)
        np.cumsum(valid.sum(axis=1), out=starts[1:])
        ids = pieces[valid] + self.size  # the spaced forms...
        firsts = starts[:-1][starts[1:] > starts[:-1]]
        ids[firsts] -= self.size  # ...but plain for each row's first piece
        taken = self.arrow.take(pa.array(ids))
        offsets = np.frombuffer(taken.buffers()[1], dtype=np.int32, count=ids.size + 1, offset=4 * taken.offset)
        rows = np.ascontiguousarray(offsets[starts])
        return pa.Array.from_buffers(pa.string(), pieces.shape[0], [None, pa.py_buffer(rows), taken.buffers()[2]])

    def render_one(self, row) -> str:
        return " ".join(self.text_list[p] for p in row if p >= 0)


# Shared with engagement.measure, so pieces and free text are parsed identically.
TOKEN_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")
EMOJI_RE = re.compile("[\U0001F300-\U0001FAFF\u2600-\u27BF]")
GESTURE_RE = re.compile(r"\*[^*\n]+\*")
SENTENCE_RE = re.compile(r"[^.!?]+[.!?]+")


def tokens(text: str) -> list[str]:
    return TOKEN_RE.findall(text.lower())


def content_words(text: str) -> set[str]:
    return {w for w in tokens(text) if w not in NON_CONTENT and w not in UNSAFE}


def sentences(text: str) -> list[str]:
    """Sentences of `text`, gestures and emojis left out."""
    bare = EMOJI_RE.sub(" ", GESTURE_RE.sub(" ", text))
    return [s for s in (m.strip() for m in SENTENCE_RE.findall(bare)) if s and TOKEN_RE.search(s.lower())]


PIECES = Pieces()
