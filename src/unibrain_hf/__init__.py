"""UniBrain as a Hugging Face-native package."""
