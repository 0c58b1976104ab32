"""fairseq data2vec checkpoints in and out (docs/fairseq.md).

ckpt.py reads / writes the file format; layouts.py says where each fairseq weight lives in
our tree for data2vec_text, data2vec_audio and data2vec_multi (2.0: text, audio, image);
convert.py moves the weights (student and EMA teacher) both ways; arch.py turns the
checkpoint's model config into our config keys; load.py is what init and the trainer call.
"""
