"""Named layouts shared by every backend (torch reference, Triton, C++).

``SUMS``: the device sums that every history write (the update pass, a stored or probed
prediction) returns, by position. Code reads them by name through ``SUMS.index(name)``
or a typed wrapper, never by a bare number.

* ``d11``, ``d22``, ``d12``: <d1, d1>, <d2, d2>, <d1, d2> of the two newest residual
  differences d1 = R1 - R2, d2 = R2 - R3 (the TSI's three sums);
* ``err2``: ||R_hat - R||^2 of a probe prediction against the computed residual;
* ``r2``: ||R||^2 of the residual written;
* ``nonfinite``: the count of non-finite values written;
* ``p2``, ``spare``: ||R_hat||^2 and a spare slot.
"""

SUMS = ("d11", "d22", "d12", "err2", "r2", "nonfinite", "p2", "spare")
NSUMS = len(SUMS)
