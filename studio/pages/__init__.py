"""One page per task: model, inspect, quantize, evaluate, chat."""
