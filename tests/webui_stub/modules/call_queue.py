"""modules/call_queue.py: A1111 and Forge hold ``queue_lock`` for the whole of every generation."""
import threading

queue_lock = threading.Lock()
