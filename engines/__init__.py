"""DeepFlow and the engines that run it.

Importing this package must stay free of torch: the streamer runs on the
lightweight runtime dependencies alone. The torch model lives in
``engines.deepflow`` and is imported only by the trainer and the torch engine.
"""
