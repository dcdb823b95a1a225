"""redpacket"""
