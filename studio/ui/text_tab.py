"""The Text tab: a causal LM with a weighted mix of language-model adapters from the library."""

from __future__ import annotations

import gradio as gr

from studio.ui import gate_map
from studio.ui.generate_tab import show_gate_maps
from studio.ui.text_service import TextStudio

SLOTS = 3


def build(text: TextStudio, run) -> None:
    gr.Markdown("Mix language-model adapters (any method) with weights and complete a prompt. Greedy at "
                "temperature 0, so a prompt always gives the same text. With a routed mixture in the mix, its "
                "router's mean gate per expert and block over the completion shows under the text.")
    with gr.Row():
        with gr.Column(scale=5):
            base = gr.Dropdown(list(text.bases), value=next(iter(text.bases)), label="language model",
                               elem_id="lm_base")
            prompt = gr.Textbox("Q: What colour is a frog?\nA:", label="prompt", lines=3, elem_id="lm_prompt")
            rows = []
            for i in range(SLOTS):
                with gr.Row():
                    key = gr.Dropdown(text.keys(), value=None, label=f"adapter {i + 1}", allow_custom_value=True,
                                      elem_id=f"lm_slot{i}_key", scale=3)
                    weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="weight", elem_id=f"lm_slot{i}_weight",
                                       scale=3)
                rows += [key, weight]
            with gr.Row():
                tokens = gr.Number(64, precision=0, minimum=1, label="new tokens", elem_id="lm_tokens")
                temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="temperature (0 = greedy)")
                seed = gr.Number(0, precision=0, label="seed")
            go = gr.Button("Complete", variant="primary", elem_id="lm_generate")
        with gr.Column(scale=4):
            out = gr.Textbox(label="text", lines=14, elem_id="lm_text", buttons=["copy"])
            gate_maps = gr.Image(label="router: mean gate per expert and block (this completion)", type="pil",
                                 format="png", interactive=False, visible=False, elem_id="lm_gate_maps",
                                 height="auto", show_label=False)  # each map has its title
            maps_state = gr.State(None)  # shown by a follow-up, so /complete_text keeps its one output

    def on_complete(base_, prompt_, tokens_, temperature_, seed_, *values):
        mix = [(values[2 * i], values[2 * i + 1]) for i in range(SLOTS) if values[2 * i]]
        completed, maps = text.complete_with_maps(base_, prompt_, mix, int(tokens_ or 64), float(temperature_),
                                                  int(seed_ or 0))
        return completed, gate_map.draw_all(maps)

    go.click(run(on_complete), [base, prompt, tokens, temperature, seed] + rows, [out, maps_state],
             api_name="complete_text", concurrency_id="model",
             concurrency_limit=1).success(show_gate_maps, maps_state, gate_maps, api_visibility="private")
    for key in rows[0::2]:
        key.focus(lambda: gr.update(choices=text.keys()), None, key, api_visibility="private")
