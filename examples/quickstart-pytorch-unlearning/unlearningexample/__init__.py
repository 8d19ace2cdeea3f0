"""unlearningexample: Flower's quickstart-pytorch layout with fedunlearn added."""
