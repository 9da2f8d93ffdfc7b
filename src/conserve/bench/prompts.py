"""Prompts of a requested token length, made of common English words (nothing is fetched or shipped).

Each prompt is a seeded random sequence of words from WORDS (random per position, so distinct prompts
share no long prefix and a server's prefix cache cannot short-cut them). Token counts:
- with a HF `tokenizer.json` (--tokenizer-json), the text is cut so that this tokenizer encodes it,
  without special tokens, to exactly the requested number of tokens (the server may still add a BOS
  token or a chat template);
- without one, one word is taken as one token: these plain lowercase words are single tokens in the
  common BPE vocabularies (Llama, Qwen, GPT), so the count is close but approximate. The report always
  uses the server's own `usage.prompt_tokens`.
"""

from __future__ import annotations

import random

_WORD_LIST = """
the of and to in is it you that he was for on are with as his they be at one have this from or had by
word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him two
has look more day could go come did number sound no most people my over know water than call first who
may down side been now find any new work part take get place made live where after back little only
round man year came show every good me give our under name very through just form sentence great think
say help low line differ turn cause much mean before move right boy old too same tell does set three
want air well also play small end put home read hand port large spell add even land here must big high
such follow act why ask men change went light kind off need house picture try us again animal point
mother world near build self earth father head stand own page should country found answer school grow
study still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real life few
north open seem together next white children begin got walk example ease paper group always music those
both mark often letter until mile river car feet care second book carry took science eat room friend
began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half rock order
fire south problem piece told knew pass since top whole king space heard best hour better true during
hundred five remember step early hold west ground interest reach fast verb sing listen six table travel
less morning ten simple several vowel toward war lay against pattern slow center love person money serve
appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry
dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green quick develop ocean warm free minute strong special mind
behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object
decide surface deep moon island foot system busy test record boat common gold possible plane dry wonder
laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant fill
east paint language among
"""
WORDS: tuple[str, ...] = tuple(_WORD_LIST.split())


def sample_lengths(n: int, mean: int, range_ratio: float, rng: random.Random) -> list[int]:
    """n lengths uniform over the integers in [mean * (1 - r), mean * (1 + r)] (vLLM's random
    dataset range ratio), never below 1; r = 0 gives mean every time."""
    if range_ratio <= 0:
        return [mean] * n
    low, high = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return [rng.randint(low, high) for _ in range(n)]


class PromptBuilder:
    """Builds prompt texts; one instance per tokenizer (loading tokenizer.json takes a moment)."""

    def __init__(self, tokenizer_json: str | None = None) -> None:
        self._tok = None
        if tokenizer_json is not None:
            from tokenizers import Tokenizer  # only when asked: keeps the CLI light

            try:
                self._tok = Tokenizer.from_file(tokenizer_json)
            except Exception as e:  # noqa: BLE001 - the tokenizers package raises plain Exceptions
                raise ValueError(f"cannot load tokenizer {tokenizer_json}: {e}") from None

    @property
    def exact(self) -> bool:
        """Whether build() lengths are exact token counts (a tokenizer is loaded)."""
        return self._tok is not None

    def count(self, text: str) -> int:
        """Tokens in text: by the tokenizer, else by the one-token-per-word rule."""
        if self._tok is None:
            return len(text.split())
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def build(self, num_tokens: int, rng: random.Random) -> str:
        words = [rng.choice(WORDS) for _ in range(num_tokens)]
        if self._tok is None:
            return " ".join(words)
        return self._fit(" ".join(words), num_tokens, rng)

    def _fit(self, text: str, n: int, rng: random.Random) -> str:
        """Grow or cut text until the tokenizer gives exactly n tokens. Cutting at a token's end offset
        almost always re-encodes to n; the few tries left cover merges across the cut."""
        best = text
        for _ in range(8):
            enc = self._tok.encode(text, add_special_tokens=False)
            have = len(enc.ids)
            if have == n:
                return text
            best = text
            if have > n:
                text = text[:enc.offsets[n - 1][1]].rstrip()
            else:
                text = text + " " + " ".join(rng.choice(WORDS) for _ in range(n - have + 1))
        return best
