"""Pretraining with accelerate: recipes, the data mixture, the tokenizer and the training loop.

accelerate launch -m parameternet_llm.training --config RECIPE [dotted.key=value ...]
"""
