package attest

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"

	"github.com/vtpmd/vtpmd/internal/swtpmtest"
	"github.com/vtpmd/vtpmd/manager/eventlog"
)

// akTemplate is a restricted RSA signing key (RSASSA-SHA256), as tpm2_createak makes.
var akTemplate = tpm2.TPMTPublic{
	Type:    tpm2.TPMAlgRSA,
	NameAlg: tpm2.TPMAlgSHA256,
	ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true,
		UserWithAuth: true, Restricted: true, SignEncrypt: true},
	Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
		Scheme: tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgRSASSA,
			Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgRSASSA, &tpm2.TPMSSigSchemeRSASSA{HashAlg: tpm2.TPMAlgSHA256})},
		KeyBits: 2048,
	}),
	Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: make([]byte, 256)}),
}

type testTPM struct {
	t  *testing.T
	tp transport.TPM
}

func openTPM(t *testing.T) *testTPM {
	sw := swtpmtest.Start(t)
	tp, err := linuxudstpm.Open(sw.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tp.Close() })
	return &testTPM{t, tp}
}

// primary creates a primary key in the endorsement hierarchy: its handle and TPM2B_PUBLIC.
func (k *testTPM) primary(tmpl tpm2.TPMTPublic) (tpm2.NamedHandle, []byte) {
	r, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(tmpl)}.Execute(k.tp)
	if err != nil {
		k.t.Fatal(err)
	}
	return tpm2.NamedHandle{Handle: r.ObjectHandle, Name: r.Name}, tpm2.Marshal(r.OutPublic)
}

func (k *testTPM) extend(pcr int, d []byte) {
	_, err := tpm2.PCRExtend{PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: d}}}}.Execute(k.tp)
	if err != nil {
		k.t.Fatal(err)
	}
}

func (k *testTPM) pcrs(sel PCRSelection) [][]byte {
	var out [][]byte
	for _, p := range sel.PCRs() {
		r, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
			{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(uint(p))}}}}.Execute(k.tp)
		if err != nil {
			k.t.Fatal(err)
		}
		out = append(out, r.PCRValues.Digests[0].Buffer)
	}
	return out
}

func (k *testTPM) quote(ak tpm2.NamedHandle, qualifying []byte, sel PCRSelection) (attest, sig []byte) {
	var list []uint
	for _, p := range sel.PCRs() {
		list = append(list, uint(p))
	}
	r, err := tpm2.Quote{SignHandle: tpm2.AuthHandle{Handle: ak.Handle, Name: ak.Name, Auth: tpm2.PasswordAuth(nil)},
		QualifyingData: tpm2.TPM2BData{Buffer: qualifying}, InScheme: tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
		PCRSelect: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(list...)}}},
	}.Execute(k.tp)
	if err != nil {
		k.t.Fatal(err)
	}
	return r.Quoted.Bytes(), tpm2.Marshal(r.Signature)
}

// scene is one host with a vTPM, and one report and guest quote made as the guard, the
// manager and the guest make them.
type scene struct {
	host, vtpm   *testTPM
	hostAK       tpm2.NamedHandle
	hostAKPub    []byte
	vtpmAK       tpm2.NamedHandle
	ev           Evidence
	ekPub        []byte
	hostSel      PCRSelection
	vtpmSel      PCRSelection
	uuid         []byte
	log          []byte
	guestAKPub   []byte
	reportRecord *Report
}

func newScene(t *testing.T) *scene {
	s := &scene{host: openTPM(t), vtpm: openTPM(t)}
	s.hostSel = PCRSelection{Hash: algSHA256, Mask: 0xff}
	s.vtpmSel = PCRSelection{Hash: algSHA256, Mask: 0xffffff}
	// the host boots: events into PCRs 0-7, and their log
	var events []eventlog.Event
	for i := range 12 {
		d := sha256.Sum256([]byte{byte(i)})
		pcr := i % 8
		events = append(events, eventlog.Event{PCR: uint32(pcr), Type: 0x80000001, Digests: []eventlog.Digest{{Alg: algSHA256, Value: d[:]}}, Data: []byte{byte(i)}})
		s.host.extend(pcr, d[:])
	}
	var err error
	if s.log, err = eventlog.Build([]uint16{algSHA256}, events); err != nil {
		t.Fatal(err)
	}
	s.hostAK, s.hostAKPub = s.host.primary(akTemplate)
	// the guest's vTPM: an EK, an AK, some measurements
	_, s.ekPub = s.vtpm.primary(tpm2.RSAEKTemplate)
	s.vtpmAK, s.guestAKPub = s.vtpm.primary(akTemplate)
	s.vtpm.extend(9, bytes.Repeat([]byte{9}, 32))
	s.uuid = []byte{0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6, 7, 8}
	s.ev = s.make(t, []byte("the verifier's nonce 1"))
	return s
}

func (s *scene) name(pub []byte) []byte {
	p, err := ParsePublic(pub)
	if err != nil {
		panic(err)
	}
	return p.Name
}

// make builds the report (guard and manager) and the guest's quote for nonce.
func (s *scene) make(t *testing.T, nonce []byte) Evidence {
	vd, err := PCRDigest(algSHA256, s.vtpm.pcrs(s.vtpmSel))
	if err != nil {
		t.Fatal(err)
	}
	r := &Report{Nonce: nonce, EKName: s.name(s.ekPub), AKName: s.name(s.guestAKPub), VMUUID: s.uuid,
		VTPMPCRs: s.vtpmSel, VTPMPCRDigest: vd, HostPCRs: s.hostSel, HostPCRValues: s.host.pcrs(s.hostSel),
		HostAKName: s.name(s.hostAKPub)}
	r.Attest, r.Signature = s.host.quote(s.hostAK, QualifyingData(r), s.hostSel)
	b, err := r.Encode()
	if err != nil {
		t.Fatal(err)
	}
	s.reportRecord = r
	// the report as the guest reads it: the whole NV index
	b = append(b, make([]byte, MaxReportSize-len(b))...)
	q, sig := s.vtpm.quote(s.vtpmAK, nonce, s.vtpmSel)
	return Evidence{Quote: q, QuoteSignature: sig, AKPublic: s.guestAKPub, Report: b, Nonce: nonce,
		HostAKPublic: s.hostAKPub, EventLog: s.log, ExpectEK: s.ekPub, ExpectVM: "12345678-9abc-def0-0102-030405060708"}
}

func TestVerify(t *testing.T) {
	s := newScene(t)
	res, err := Verify(s.ev)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(res.EKName, s.name(s.ekPub)) || res.VMUUID != "12345678-9abc-def0-0102-030405060708" || len(res.Proven) != 5 {
		t.Fatalf("result %+v", res)
	}
	t.Logf("proven:\n%s", strings.Join(res.Proven, "\n"))

	// the host AK as a PKIX public key works too (no TPM name to compare)
	ev := s.ev
	hp, _ := ParsePublic(s.hostAKPub)
	der, _ := x509.MarshalPKIXPublicKey(hp.Key)
	ev.HostAKPublic = der
	if _, err := Verify(ev); err != nil {
		t.Fatalf("PKIX host key: %v", err)
	}

	flip := func(b []byte, i int) []byte {
		c := bytes.Clone(b)
		c[i] ^= 1
		return c
	}
	other := newScene(t) // another host with another vTPM
	older := s.make(t, []byte("the verifier's nonce 0"))
	otherVM := s.ev
	otherVM.ExpectVM = "00000000-0000-0000-0000-000000000001"
	cases := []struct {
		name string
		mod  func(ev *Evidence)
		want error
	}{
		{"guest quote byte", func(ev *Evidence) { ev.Quote = flip(ev.Quote, len(ev.Quote)-3) }, ErrQuote},
		{"guest quote signature", func(ev *Evidence) { ev.QuoteSignature = flip(ev.QuoteSignature, 20) }, ErrQuote},
		{"guest AK", func(ev *Evidence) { ev.AKPublic = other.ev.AKPublic }, ErrQuote},
		{"nonce", func(ev *Evidence) { ev.Nonce = []byte("another nonce") }, ErrNonce},
		{"replayed report", func(ev *Evidence) { ev.Report = older.Report }, ErrReplay},
		{"report of another vTPM", func(ev *Evidence) {
			ev.Report, ev.HostAKPublic, ev.EventLog = other.ev.Report, other.ev.HostAKPublic, other.ev.EventLog
		}, ErrWrongVTPM},
		{"report nonce byte", func(ev *Evidence) { ev.Report = flip(ev.Report, 10) }, ErrBinding},
		{"report EK byte", func(ev *Evidence) { ev.Report = flip(ev.Report, 7+2+len(ev.Nonce)+5) }, ErrBinding},
		{"report padding", func(ev *Evidence) { ev.Report = flip(ev.Report, MaxReportSize-1) }, ErrMalformed},
		{"report truncated", func(ev *Evidence) { ev.Report = ev.Report[:100] }, ErrMalformed},
		{"host PCR value", func(ev *Evidence) {
			r := *s.reportRecord
			r.HostPCRValues = slicesClone(r.HostPCRValues)
			r.HostPCRValues[3] = flip(r.HostPCRValues[3], 0)
			ev.Report, _ = r.Encode()
		}, ErrBinding},
		{"hardware quote byte", func(ev *Evidence) {
			r := *s.reportRecord
			r.Attest = flip(r.Attest, len(r.Attest)-1)
			ev.Report, _ = r.Encode()
		}, ErrHostKey},
		{"event log digest", func(ev *Evidence) { ev.EventLog = flip(ev.EventLog, len(ev.EventLog)-6) }, ErrEventLog},
		{"event log truncated", func(ev *Evidence) { ev.EventLog = ev.EventLog[:len(ev.EventLog)-2] }, ErrEventLog},
		{"event log with an event added", func(ev *Evidence) {
			ev.EventLog = append(bytes.Clone(other.log), other.log[len(other.log)-47:]...)
		}, ErrEventLog},
		{"host AK key", func(ev *Evidence) { ev.HostAKPublic = other.hostAKPub }, ErrHostKey},
		{"expected EK", func(ev *Evidence) { ev.ExpectEK = other.ekPub }, ErrWrongVTPM},
		{"expected VM", func(ev *Evidence) { ev.ExpectVM = otherVM.ExpectVM }, ErrWrongVTPM},
		{"vTPM PCRs changed", func(ev *Evidence) {
			s.vtpm.extend(10, bytes.Repeat([]byte{1}, 32))
			ev.Quote, ev.QuoteSignature = s.vtpm.quote(s.vtpmAK, ev.Nonce, s.vtpmSel)
		}, ErrPCRs},
	}
	for _, c := range cases {
		ev := s.ev
		c.mod(&ev)
		_, err := Verify(ev)
		if !errors.Is(err, c.want) {
			t.Errorf("%s: got %v, want %v", c.name, err, c.want)
		} else {
			t.Logf("%s: %v", c.name, err)
		}
	}
}

// operatorCA is a CA (the operator's privacy CA) and a certificate it issues for key.
type operatorCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newOperatorCA(t *testing.T, name string) *operatorCA {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return &operatorCA{c, k}
}

func (ca *operatorCA) issue(t *testing.T, pub crypto.PublicKey) []byte {
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "host AK"},
		KeyUsage: x509.KeyUsageDigitalSignature, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func (ca *operatorCA) pem() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw})
}

// TestVerifyHostAKCertificate: the host AK trusted through the operator's certificate of it.
func TestVerifyHostAKCertificate(t *testing.T) {
	s := newScene(t)
	ca, rogue := newOperatorCA(t, "operator privacy CA"), newOperatorCA(t, "rogue CA")
	hostKey, _ := ParsePublic(s.hostAKPub)
	ev := s.ev
	ev.HostAKCert, ev.TrustAnchors = ca.issue(t, hostKey.Key), ca.pem()
	res, err := Verify(ev)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(res.HostKey, "operator privacy CA") {
		t.Fatalf("host key trusted as %q", res.HostKey)
	}
	ev.HostAKPublic = nil // the certificate alone
	if _, err := Verify(ev); err != nil {
		t.Fatal(err)
	}
	otherKey, _ := ParsePublic(newScene(t).hostAKPub)
	for _, c := range []struct {
		name string
		mod  func(ev *Evidence)
		want error
	}{
		{"certificate of another CA", func(ev *Evidence) { ev.HostAKCert = rogue.issue(t, hostKey.Key) }, ErrHostKey},
		{"certificate over another key", func(ev *Evidence) { ev.HostAKCert = ca.issue(t, otherKey.Key) }, ErrHostKey},
		{"certificate over another key, with the AK", func(ev *Evidence) {
			ev.HostAKCert, ev.HostAKPublic = ca.issue(t, otherKey.Key), s.hostAKPub
		}, ErrHostKey},
		{"no trust anchor", func(ev *Evidence) { ev.TrustAnchors = nil }, ErrInput},
		{"tampered certificate", func(ev *Evidence) {
			b, _ := pem.Decode(ev.HostAKCert)
			der := bytes.Clone(b.Bytes)
			der[len(der)-10] ^= 1
			ev.HostAKCert = der
		}, ErrHostKey},
	} {
		e := ev
		c.mod(&e)
		if _, err := Verify(e); !errors.Is(err, c.want) {
			t.Errorf("%s: got %v, want %v", c.name, err, c.want)
		}
	}
}

func slicesClone(v [][]byte) [][]byte { return append([][]byte(nil), v...) }

func TestReportRoundTrip(t *testing.T) {
	r := sampleReport()
	b, err := r.Encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := Decode(append(b, 0, 0, 0))
	if err != nil {
		t.Fatal(err)
	}
	b2, _ := got.Encode()
	if !bytes.Equal(b, b2) {
		t.Fatal("report does not round-trip")
	}
	if !bytes.Equal(QualifyingData(r), QualifyingData(got)) {
		t.Fatal("qualifying data differs after a round trip")
	}
	// every field of the qualifying data matters
	for i, mod := range []func(r *Report){
		func(r *Report) { r.Nonce = []byte("x") },
		func(r *Report) { r.EKName = append([]byte{0, 0xb}, make([]byte, 32)...) },
		func(r *Report) { r.AKName = nil },
		func(r *Report) { r.VMUUID = nil },
		func(r *Report) { r.VTPMPCRs.Mask = 1 },
		func(r *Report) { r.VTPMPCRDigest = bytes.Repeat([]byte{1}, 32) },
	} {
		c := *r
		mod(&c)
		if bytes.Equal(QualifyingData(&c), QualifyingData(r)) {
			t.Errorf("change %d does not change the qualifying data", i)
		}
	}
	// bounds
	for i, mod := range []func(r *Report){
		func(r *Report) { r.Nonce = make([]byte, MaxNonce+1) },
		func(r *Report) { r.Nonce = nil },
		func(r *Report) { r.EKName = []byte{0, 0xb, 1} },
		func(r *Report) { r.VMUUID = []byte{1} },
		func(r *Report) { r.HostPCRValues = r.HostPCRValues[1:] },
		func(r *Report) { r.Signature = make([]byte, maxBlob+1) },
	} {
		c := *r
		mod(&c)
		if _, err := c.Encode(); !errors.Is(err, ErrMalformed) {
			t.Errorf("bad report %d encodes: %v", i, err)
		}
	}
	b[4] = 2
	if _, err := Decode(b); !errors.Is(err, ErrVersion) {
		t.Errorf("version 2: %v", err)
	}
}

func sampleReport() *Report {
	name := func(c byte) []byte { return append([]byte{0, 0xb}, bytes.Repeat([]byte{c}, 32)...) }
	var values [][]byte
	for i := range 8 {
		values = append(values, bytes.Repeat([]byte{byte(i)}, 32))
	}
	return &Report{Nonce: []byte("nonce"), EKName: name(1), AKName: name(2), VMUUID: make([]byte, 16),
		VTPMPCRs: PCRSelection{Hash: algSHA256, Mask: 0xffffff}, VTPMPCRDigest: make([]byte, 32),
		HostPCRs: PCRSelection{Hash: algSHA256, Mask: 0xff}, HostPCRValues: values, HostAKName: name(3),
		Attest: binary.BigEndian.AppendUint32(nil, generated), Signature: []byte{0, 0x14, 0, 0xb, 0, 0}}
}

// TestVerifyFiles: the command's inputs as files, the text and JSON outputs.
func TestVerifyFiles(t *testing.T) {
	s := newScene(t)
	dir := t.TempDir()
	w := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	f := Files{Quote: w("quote", s.ev.Quote), Signature: w("sig", s.ev.QuoteSignature), AKPublic: w("ak.pub", s.ev.AKPublic),
		Report: w("report", s.ev.Report), Nonce: hex.EncodeToString(s.ev.Nonce), HostAKPublic: w("host-ak.pub", s.hostAKPub),
		EventLog: w("log", s.log), ExpectEK: w("ek.pub", s.ekPub), ExpectVM: s.ev.ExpectVM}
	var out bytes.Buffer
	if err := VerifyFiles(f, &out); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out.String(), "verified: deep attestation\n") || strings.Count(out.String(), "  proven: ") != 5 {
		t.Fatalf("output:\n%s", out.String())
	}
	f.JSON = true
	out.Reset()
	if err := VerifyFiles(f, &out); err != nil {
		t.Fatal(err)
	}
	var j struct {
		Verified bool   `json:"verified"`
		VMUUID   string `json:"vm_uuid"`
		EKName   string `json:"ek_name"`
	}
	if err := json.Unmarshal(out.Bytes(), &j); err != nil || !j.Verified || j.VMUUID != s.ev.ExpectVM || j.EKName != hex.EncodeToString(s.name(s.ekPub)) {
		t.Fatalf("JSON %s: %v", out.String(), err)
	}
	// the nonce as a file, a missing input, a nonce not in hex
	f.Nonce, f.NonceFile = "", w("nonce", s.ev.Nonce)
	if err := VerifyFiles(f, io.Discard); err != nil {
		t.Fatal(err)
	}
	g := f
	g.EventLog = filepath.Join(dir, "missing")
	if err := VerifyFiles(g, io.Discard); !errors.Is(err, ErrInput) {
		t.Fatalf("missing event log: %v", err)
	}
	g = f
	g.NonceFile, g.Nonce = "", "not hex"
	if err := VerifyFiles(g, io.Discard); !errors.Is(err, ErrInput) {
		t.Fatalf("bad nonce: %v", err)
	}
}
