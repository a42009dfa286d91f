"""`parameternet-llm demo`: the embedded corpus, dense and ParameterNet pretraining on it, scores and report."""
