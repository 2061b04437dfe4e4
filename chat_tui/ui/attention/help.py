"""The `?` screen of the inspector: what the current view shows, its formula, and where the README says more."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

from chat_tui.engine.inside import INSIDE_VIEWS

README_SECTION = "README.md, “The attention inspector”"
INSIDE_SECTION = "README.md, “Inside the next token”"  # the lens, attribution, rollout, knock-out, tokens and block

# (what it shows, the formula, how to read it); plain words first, the jargon explained where it appears
VIEW_HELP: dict[str, tuple[str, str, str]] = {
    "heatmap": (
        "Each row is a token (the query, down the left); each cell is how much that token looked at an "
        "earlier token (the key, across) in one layer and head. A row's weights add up to 1.",
        "weightⱼ = softmax(q·kⱼ / √d)   (row i sees keys 0…i only)",
        "Bright = much attention. n changes the colour scale (the legend says what bright means); "
        "“sink”: the first token, where many heads park attention they do not need elsewhere. "
        "[ ] layer, { } head, m the mean or max over heads, ↑ ↓ another token.",
    ),
    "row": (
        "The selected token's row of the heatmap as bars: one per earlier token, its share of the attention.",
        "weightⱼ = softmax(q·kⱼ / √d)",
        "s sorts by weight. The bars of a row add up to 100%.",
    ),
    "explain": (
        "Why the selected token attends where it does: the real numbers of one head, recomputed.",
        "scoreⱼ = q·kⱼ → ÷√d → wⱼ = softmax(…) → out = Σ wⱼ vⱼ;  ‖wⱼvⱼ‖ = key j's share of the output",
        "A large weight on a key with a small value vector adds little: ‖wⱼvⱼ‖ shows what reaches the "
        "output. The last line checks the recomputed weights against the stored ones (stored in float16, "
        "a 16-bit number, so they agree to about 1e-3).",
    ),
    "heads": (
        "Every head of the selected layer at the selected token: how spread out its attention is and where it goes.",
        "entropy H = −Σ wⱼ log₂ wⱼ  (bits)",
        "Entropy in bits: 0 = all attention on one token; log₂(n) = spread evenly over n tokens. "
        "“first” = share on the first token (the sink), “prev” = share on the token just before.",
    ),
    "turns": (
        "How the selected token's attention divides between the messages of the conversation.",
        "share(message) = Σ wⱼ over the message's tokens",
        "The system prompt, your messages and the replies each get a bar.",
    ),
    "candidates": (
        "The likeliest next tokens at the selected step, before and after the sampling chain, and which "
        "stage dropped each one.",
        "p = softmax(logits / T), then top-k, top-p, min-p … keep a subset",
        "Change a setting in the sampling pane and this view shows what the new settings would have kept.",
    ),
    "lens": (
        "What the model would predict next if it stopped after each layer: the residual stream after that "
        "layer, read out through the final layer norm and the output head (the logit lens).",
        "pₗ = softmax(W_out · LN_f(hₗ))   for each layer ℓ",
        "The commitment layer is the first layer from which the token finally chosen stays the top guess. "
        "Early commitment: an easy token; late: the last layers decided it.",
    ),
    "attribution": (
        "How much each attention head and each MLP pushed this token's score (its logit) up or down: "
        "each part's output, through the final layer norm, dotted with the token's output vector.",
        "logit = Σ parts (embed, each head, each MLP) + bias;   partᵢ = (outᵢ / σ) · γ · w_token",
        "Green pushed the token up, red pushed it down. σ is the final layer norm's scale at this position, "
        "frozen, so the parts add up exactly: the check line shows by how much they miss (under 1e-4).",
    ),
    "rollout": (
        "Where the token's information came from through all the layers, not just one: attention rollout "
        "(Abnar & Zuidema, 2020), beside the last layer's own attention.",
        "R = Πₗ (½·Aₗ + ½·I)   (heads averaged, rows renormalised)",
        "The ½·I stands for the residual connection: each layer also keeps what the token already had. "
        "Rollout is often more spread out than any single layer.",
    ),
    "knockout": (
        "Switch attention heads off (their output set to zero) and see how the next-token distribution "
        "changes, on the same prefix.",
        "KL(before ‖ after) = Σ p log₂(p / q)   (bits)",
        "k switches the selected head off or on, K turns them all back on, c continues the reply with "
        "those heads off as a new branch. KL in bits: 0 = no change; 1 bit ≈ a fair coin's worth.",
    ),
    "tokens": (
        "How the tokenizer cuts text into the pieces (tokens) the model reads: each token's id and bytes, "
        "for the text you are typing or a picked message.",
        "count ≤ context window (the model sees at most that many tokens)",
        "A byte-level BPE works on UTF-8 bytes: a Chinese character is three bytes, and when no merge covers "
        "all three it is two or three tokens, shown as <0xE4>.",
    ),
    "block": (
        "One decoder block for this token, top to bottom, with the model's real numbers: embeddings, layer "
        "norm, q/k/v, attention, residual add, MLP, residual add.",
        "x ← x + Attn(LN₁(x));   x ← x + MLP(LN₂(x))",
        "‖·‖ is a vector's length. The residual stream x carries everything forward; each sub-layer adds to it.",
    ),
}


class ViewHelpScreen(ModalScreen[None]):
    """A short explanation of one inspector view (`?` on the inspector)."""

    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close", id="view_help_close")]

    def __init__(self, view: str, title: str) -> None:
        super().__init__()
        self.view = view
        self.title_text = title

    def compose(self) -> ComposeResult:
        what, formula, reading = VIEW_HELP.get(self.view, (self.title_text, "", ""))
        with Vertical(id="view-help-box", classes="dialog"):
            yield Static(Text(self.title_text, style="bold"), classes="dialog-title")
            body = Text(what + "\n\n")
            body.append(formula + "\n\n", style="bold")
            body.append(reading + "\n\n")
            section = INSIDE_SECTION if self.view in INSIDE_VIEWS else README_SECTION
            body.append(f"More in {section}. Esc closes.", style="dim")
            yield Static(body, id="view-help-text")
