/* Everything the cffi module exposes: one include for build_fastpath.py. */
#ifndef GDP_FASTPATH_H
#define GDP_FASTPATH_H

#include "geneve.h"
#include "engine.h"
#include "testpoints.h"
#include "auth.h"

#endif
