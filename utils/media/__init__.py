"""Layer 2, media inputs: audio (decoding, resampling, the mel spectrogram), images and video frames, FFmpeg
opened safely, the SentencePiece tokenizer; each exactly as the μOmni trainers preprocessed."""
