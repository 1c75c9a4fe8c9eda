"""A procedural demo world: prompted videos of simple moving shapes, and an evaluator that scores them.

``memrope.runtime.demo.world`` renders scenes from ordinary prompt sentences;
``memrope.runtime.demo.evaluate`` recovers a scene from decoded frames with classical image
processing and scores it against a prompt. Both are numpy only (see docs/demo_world.md).
"""
